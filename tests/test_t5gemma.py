"""T5Gemma encoder (Stable Audio 3's text encoder): parity with Hugging Face's PyTorch T5Gemma encoder, checkpoint
loading (encoder-only and full encoder-decoder files, named errors), the learned padding embedding of SA3's prompt
conditioner, and the "t5gemma" text-encoder kind as config sections select it.

The checkpoints are tiny random transformers models written with save_pretrained (no download), with the caption
BPE tokenizer of the embedded encoder saved beside them; both implementations read the same directory. The tiny
config exercises every Gemma-2 detail with visible effect: grouped-query attention (4 query heads on 2 key/value
heads), a sliding window of 4 (layer 0) next to full attention (layer 1) at 24 tokens, a soft-cap of 5 that the
enlarged query/key weights push the logits well into, query_pre_attn_scalar != head_dim and random (1 + w) norm
weights. Measured fp32 error: 1.0e-6 of max|ref| (6.4e-6 absolute at an output scale of 6.3; bound: 1e-4 of
max|ref|).
"""

import contextlib
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from musicdiff.config import load_config
from musicdiff.errors import ConfigError, DataError
from musicdiff.models import registry as model_registry
from musicdiff.models.conditioning import MultiConditioner, build_conditioner
from musicdiff.models.text_encoder import (T5GemmaEncoder, T5GemmaEncoderConfig, T5GemmaKind, TextTokenizer,
                                           build_caption_tokenizer, load_t5gemma_encoder, load_text_encoder,
                                           text_encoder_kind)
from musicdiff.parallel import DEFAULT_SHARDING_RULES, make_mesh, mesh_config
from musicdiff.parallel.sharding import sharding_context

pytestmark = pytest.mark.usefixtures("unsharded")

SENTENCES = [
    "warm analog synth arpeggios over a slow house groove",
    "a long cinematic build with taiko drums, brass stabs, a rising string ostinato and a choir that enters halfway, "
    "far longer than the tokenizer's maximum length",
    "dusty boom bap loop",
    "rain",
]
MAX_LENGTH = 24
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=32, sliding_window=4,
            attn_logit_softcapping=5.0, rope_parameters=dict(rope_type="default", rope_theta=1000.0))
# The tiny checkpoint's sizes as a text_encoder section gives them (configs/text_encoder.py:t5gemma_b's keys and the
# ones whose t5gemma-b values the preset leaves to config.json).
TINY_SECTION = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, head_dim=16, attn_logit_softcapping=5.0, num_key_value_heads=2,
                    query_pre_attn_scalar=32, sliding_window=4, rope_theta=1000.0)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def make_checkpoint(torch, directory, model_class="T5GemmaEncoderModel"):
    """A random T5Gemma saved with save_pretrained, plus a tokenizer (pad id 0, as T5Gemma's). Norm weights are
    randomised (Hugging Face initialises them to 0, i.e. scale 1) and query/key weights enlarged, so a wrong mapping
    of any tensor, a missing (1 + w) or soft-cap shows in the outputs."""
    import transformers

    torch.manual_seed(0)
    config = transformers.T5GemmaConfig(encoder=TINY, decoder=TINY, vocab_size=TINY["vocab_size"],
                                        is_encoder_decoder=model_class != "T5GemmaEncoderModel")
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                param.copy_(torch.randn_like(param) * 0.5)
            if "q_proj" in name or "k_proj" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(str(directory))
    build_caption_tokenizer(SENTENCES * 4, directory, TINY["vocab_size"])
    return model


def torch_outputs(torch, model, directory):
    """Hugging Face's last hidden states (fp32) and the token batch."""
    tokens = TextTokenizer(directory, MAX_LENGTH)(SENTENCES)
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    with torch.no_grad():
        hidden = encoder(input_ids=torch.from_numpy(tokens["input_ids"].astype(np.int64)),
                         attention_mask=torch.from_numpy(tokens["attention_mask"].astype(np.int64))).last_hidden_state
    return hidden.float().numpy(), tokens


def run_ours(encoder, tokens, mesh=None):
    context = sharding_context(mesh, DEFAULT_SHARDING_RULES) if mesh is not None else contextlib.nullcontext()
    with jax.default_matmul_precision("highest"), context:
        out, mask = nnx.jit(lambda m, ids, am: m(ids, am))(encoder, tokens["input_ids"], tokens["attention_mask"])
    return np.asarray(out.astype(jnp.float32)), np.asarray(mask)


def relative_error(ours, reference, mask):
    """max |ours - ref| over the real positions, over max |ref| there (pads differ by design: ours are zero)."""
    return float(np.abs(ours - reference)[mask].max() / np.abs(reference[mask]).max())


@pytest.fixture(scope="module")
def checkpoint(torch, tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5gemma")
    model = make_checkpoint(torch, directory)
    return directory, model


def test_parity_with_torch_fp32_sharded(torch, checkpoint, devices, measurement):
    directory, model = checkpoint
    reference, tokens = torch_outputs(torch, model, directory)
    mask = tokens["attention_mask"]
    assert mask[1].all() and not mask[3].all()  # one caption truncated at MAX_LENGTH, one padded
    mesh = make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
    encoder = load_t5gemma_encoder(directory, mesh=mesh)
    # Loaded straight into shards: embed on fsdp, mlp/heads/vocab on tensor (2 kv heads split 2 ways too).
    assert encoder.blocks[0].ff.wi[...].sharding.spec == P("fsdp", "tensor")
    assert encoder.blocks[1].attention.key[...].sharding.spec == P("fsdp", "tensor")
    assert encoder.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    assert [block.sliding for block in encoder.blocks] == [True, False]
    ours, our_mask = run_ours(encoder, tokens, mesh)
    np.testing.assert_array_equal(our_mask, mask)
    assert np.all(ours[~mask] == 0.0)
    error = relative_error(ours, reference, mask)
    measurement(f"T5Gemma fp32 max abs diff vs PyTorch / max|ref| ({np.abs(reference[mask]).max():.2f})", error)
    assert error <= 1e-4, f"T5Gemma fp32 parity: {error:.3e} of max|ref|"


def test_padding_is_ignored_and_bf16_is_close(checkpoint):
    directory, _ = checkpoint
    tokens = TextTokenizer(directory, MAX_LENGTH)(SENTENCES)
    encoder = load_t5gemma_encoder(directory)
    reference, mask = run_ours(encoder, tokens)
    # Real positions cannot see what sits in padded slots.
    scrambled = dict(tokens, input_ids=np.where(tokens["attention_mask"], tokens["input_ids"], 7))
    other, _ = run_ours(encoder, scrambled)
    np.testing.assert_allclose(other, reference, atol=1e-5)
    low = load_t5gemma_encoder(directory, dtype=jnp.bfloat16)
    assert low.embed_tokens[...].dtype == jnp.float32  # parameters stay fp32; only compute is bf16
    out, _ = nnx.jit(lambda m, ids, am: m(ids, am))(low, tokens["input_ids"], tokens["attention_mask"])
    assert out.dtype == jnp.bfloat16
    relative = float(np.linalg.norm(np.asarray(out, np.float32) - reference) / np.linalg.norm(reference))
    assert relative < 3e-2, f"bf16 vs fp32 relative L2 error {relative:.3e}"


@pytest.mark.parametrize("model_class", ["T5GemmaModel", "T5GemmaForConditionalGeneration"])
def test_full_checkpoints_load_their_encoder(torch, tmp_path, model_class):
    """T5GemmaModel stores encoder.* and decoder.*; T5GemmaForConditionalGeneration model.encoder.* and
    model.decoder.*: the decoder is dropped, either prefix loads."""
    from safetensors import safe_open

    model = make_checkpoint(torch, tmp_path, model_class)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as handle:
        prefixes = {key.split("layers")[0] for key in handle.keys() if ".layers." in key}
    expected = {"T5GemmaModel": {"encoder.", "decoder."},
                "T5GemmaForConditionalGeneration": {"model.encoder.", "model.decoder."}}[model_class]
    assert prefixes == expected
    reference, tokens = torch_outputs(torch, model, tmp_path)
    ours, _ = run_ours(load_t5gemma_encoder(tmp_path), tokens)
    assert relative_error(ours, reference, tokens["attention_mask"]) <= 1e-4


def test_missing_or_misshapen_tensor_is_named_with_its_file(torch, tmp_path):
    from safetensors.numpy import load_file, save_file

    make_checkpoint(torch, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["encoder.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(DataError, match=r"model\.safetensors.*'encoder\.layers\.1\.mlp\.down_proj\.weight "
                                        r"\(parameter blocks\.1\.ff\.wo\)'"):
        load_t5gemma_encoder(tmp_path)
    tensors["encoder.layers.1.mlp.down_proj.weight"] = np.zeros((64, 100), np.float32)
    save_file(tensors, str(file))
    with pytest.raises(DataError, match=r"model\.safetensors: encoder\.layers\.1\.mlp\.down_proj\.weight has shape "
                                        r"\(100, 64\)"):
        load_t5gemma_encoder(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        load_t5gemma_encoder(tmp_path / "nowhere")


def test_config_json_details_are_read_or_refused():
    hub_style = {"model_type": "t5gemma", "encoder": {**TINY, "rope_parameters": None, "rope_theta": 500.0,
                                                      "layer_types": ["full_attention", "full_attention"]}}
    config = T5GemmaEncoderConfig.from_mapping(hub_style)
    assert config.rope_theta == 500.0 and config.query_pre_attn_scalar == 32 and config.num_key_value_heads == 2
    assert [config.layer_type(i) for i in range(2)] == ["full_attention", "full_attention"]
    with pytest.raises(ConfigError, match="rope_type='linear'"):
        T5GemmaEncoderConfig.from_mapping({**TINY, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match="attention_bias=True"):
        T5GemmaEncoderConfig.from_mapping({**TINY, "attention_bias": True})
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        T5GemmaEncoderConfig.from_mapping({**TINY, "num_key_value_heads": 3})


def _diffusion_configs(repo_root):
    spec = importlib.util.spec_from_file_location("diffusion_configs_for_t5gemma", repo_root / "configs/diffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learned_padding_replaces_exactly_the_padded_positions(repo_root):
    conditioner = MultiConditioner(_diffusion_configs(repo_root).conditioner_config("t5gemma", 768).conditioning,
                                   rngs=nnx.Rngs(0))
    prompt = conditioner.conditioners["prompt"]
    # SA3's layout: no projection at 768, and the vector sits where its checkpoint key says.
    assert not prompt.project and prompt.padding_embedding[...].shape == (768,)
    assert ("conditioners", "prompt", "padding_embedding") in dict(nnx.to_flat_state(nnx.state(conditioner)))
    pad = np.asarray(jax.random.normal(jax.random.key(1), (768,)), np.float32)
    prompt.padding_embedding[...] = jnp.asarray(pad)
    embeddings = np.asarray(jax.random.normal(jax.random.key(2), (3, 256, 768)), np.float32)
    mask = np.arange(256)[None, :] < np.array([[5], [256], [0]])
    out, out_mask = prompt({"embeddings": jnp.asarray(embeddings), "mask": jnp.asarray(mask)})
    out = np.asarray(out)
    np.testing.assert_array_equal(np.asarray(out_mask), mask)  # the mask is passed on unchanged
    np.testing.assert_array_equal(out[mask], embeddings[mask])
    np.testing.assert_array_equal(out[~mask], np.broadcast_to(pad, out[~mask].shape))
    zero = build_conditioner({"id": "prompt", "type": "t5gemma", "config": {}}, 768, nnx.Rngs(0))
    assert np.all(np.asarray(zero({"embeddings": embeddings, "mask": mask})[0])[~mask] == 0.0)
    with pytest.raises(ConfigError, match="padding_mode='edge'"):
        build_conditioner({"id": "prompt", "type": "t5gemma", "config": {"padding_mode": "edge"}}, 768,
                          nnx.Rngs(0))


def test_the_registered_kind_is_what_config_sections_select(checkpoint, repo_root, tmp_path):
    directory, _ = checkpoint
    kind = text_encoder_kind("t5gemma")
    assert isinstance(kind, T5GemmaKind)
    config = load_config(f"{repo_root}/configs/text_encoder.py:t5gemma_b", [f"text_encoder.path={directory}"])
    section = config.text_encoder
    assert section.max_length == 256  # SA3's prompt length
    # The preset's sizes are t5gemma-b's; the tiny checkpoint's config.json disagrees and the loader says so.
    with pytest.raises(ConfigError, match=r"config\.text_encoder\.vocab_size=256000: the checkpoint .* has 300"):
        load_text_encoder(section, nnx.Rngs(0))
    section = ml_collections.ConfigDict({**section.to_dict(), **TINY_SECTION, "max_length": MAX_LENGTH})
    encoder, tokenizer = load_text_encoder(section, nnx.Rngs(0))
    assert isinstance(encoder, T5GemmaEncoder) and tokenizer.max_length == MAX_LENGTH

    # Generation: prompts -> the frozen encoder's outputs, as precompute stores them (real tokens, zero pads).
    prompts = kind.prompt_encoder(section, "config.prompt_encoder.name")(SENTENCES)
    direct, mask = run_ours(encoder, tokenizer(SENTENCES))
    np.testing.assert_allclose(prompts["embeddings"], direct, atol=1e-5)
    np.testing.assert_array_equal(prompts["mask"], mask)
    # Precompute stores each caption's real tokens; training pads them back to max_length.
    mesh = make_mesh(mesh_config())
    fields = kind.caption_fields(section, tmp_path, mesh=mesh, rules=DEFAULT_SHARDING_RULES, batch_size=2,
                                 dtype=np.float32)(SENTENCES)
    entry = kind.manifest_entry(section, tmp_path)
    assert entry["embedding_dim"] == 64 and entry["max_length"] == MAX_LENGTH and entry["name"] == "t5gemma"
    record = kind.record_fields(fields[SENTENCES[3]], entry)
    np.testing.assert_array_equal(record["prompt_mask"], mask[3])
    np.testing.assert_allclose(record["prompt_embeddings"], direct[3], atol=1e-5)

    # The conditioner's width: the named model's, or the entry's `dim`.
    assert kind.conditioner_encoder("prompt", {}, nnx.Rngs(0), jnp.float32) == (768, None)
    assert kind.conditioner_encoder("prompt", {"dim": 64}, nnx.Rngs(0), jnp.float32) == (64, None)
    with pytest.raises(ConfigError, match="unknown t5gemma_model_name 'google/t5gemma-2b-2b-ul2'"):
        kind.conditioner_encoder("prompt", {"t5gemma_model_name": "google/t5gemma-2b-2b-ul2"}, nnx.Rngs(0),
                                 jnp.float32)
    # The model registry builds the same architecture at random (describe): closed-form parameter count.
    built = model_registry.build(section, nnx.Rngs(0))
    d, f, vocab, kv = 64, 128, 300, 2 * 16
    per_layer = d * 64 + 2 * d * kv + 64 * d + 3 * d * f + 4 * d
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(built, nnx.Param)))
    assert count == vocab * d + 2 * per_layer + d


def test_the_tiny_config_exercises_each_gemma_detail(checkpoint):
    """Negative controls for the parity test: without the soft-cap, the sliding window or Gemma's query scaling
    the outputs move by far more than the parity bound, so parity checks each of them."""
    directory, _ = checkpoint
    tokens = TextTokenizer(directory, MAX_LENGTH)(SENTENCES)
    encoder = load_t5gemma_encoder(directory)
    reference, mask = run_ours(encoder, tokens)
    variants = {"no soft-cap": lambda e: setattr(e.blocks[0].attention, "softcap", None),
                "no window": lambda e: setattr(e.blocks[0], "sliding", False),
                "head_dim scaling": lambda e: setattr(e.blocks[1].attention, "scale", 16**-0.5)}
    for name, change in variants.items():
        changed = load_t5gemma_encoder(directory)
        change(changed)
        error = relative_error(run_ours(changed, tokens)[0], reference, mask)
        assert error > 1e-2, f"{name}: outputs moved by only {error:.2e} of max|ref|"

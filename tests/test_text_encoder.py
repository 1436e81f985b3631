"""T5 encoder: parity with Hugging Face's PyTorch T5EncoderModel, checkpoint loading into sharded params, t5-base size.

The torch tests build small random T5 checkpoints with save_pretrained (no download) plus a Unigram tokenizer
trained on a few sentences; both implementations read the same directory.
"""

import contextlib
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from musicdiff.parallel import DEFAULT_SHARDING_RULES, mesh_config
from musicdiff.errors import ConfigError, DataError
from musicdiff.models.text_encoder import (
    T5Encoder,
    T5EncoderConfig,
    TextTokenizer,
    load_t5_encoder,
    load_text_encoder,
    relative_position_buckets,
)
from musicdiff.parallel import make_mesh
from musicdiff.parallel.sharding import sharding_context

# These tests call bare modules; model code needs a declared layout (musicdiff/parallel/sharding.py).
pytestmark = pytest.mark.usefixtures("unsharded")

SENTENCES = [
    "a calm piano melody with soft strings",
    "energetic drum and bass at one hundred seventy four beats per minute with a heavy sub bass and chopped vocals "
    "that keeps going well past the maximum length of the tokenizer",
    "lo fi hip hop beat",
    "ambient pads",
]
MAX_LENGTH = 24
SMALL = dict(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
             relative_attention_num_buckets=16, relative_attention_max_distance=20)  # log buckets within 24 tokens
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu")


def closed_form_param_count(vocab_size, d_model, d_kv, d_ff, num_layers, num_heads, relative_attention_num_buckets,
                            gated=False, **_):
    attention = 4 * d_model * num_heads * d_kv  # q, k, v, o without biases
    feed_forward = (3 if gated else 2) * d_model * d_ff
    norms = 2 * d_model
    return (vocab_size * d_model + num_layers * (attention + feed_forward + norms)
            + relative_attention_num_buckets * num_heads + d_model)


def test_t5_base_closed_form_count_and_describe(tmp_path, repo_root):
    assert closed_form_param_count(**T5_BASE) == 109_628_544
    result = subprocess.run(
        [sys.executable, "-m", "launch.describe", "--config=configs/text_encoder.py:t5_base", f"--workdir={tmp_path}"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "109,628,544" in result.stdout
    report = json.loads((tmp_path / "describe.json").read_text())
    assert report["models"]["text_encoder"]["param_count"] == 109_628_544


def test_buckets_closed_form():
    # 16 buckets per direction: exact below 8, then 8 + floor(log(n/8)/log(128/8) * 8), capped at 15; keys after the
    # query add 16.
    buckets = relative_position_buckets(1, 300, 32, 128)[0]
    expected = [n if n < 8 else min(15, 8 + int(np.log(n / 8) / np.log(16) * 8)) for n in range(300)]
    expected = [e + (16 if n > 0 else 0) for n, e in enumerate(expected)]
    assert buckets.tolist() == expected
    backwards = relative_position_buckets(300, 1, 32, 128)[:, 0]
    assert backwards.tolist() == [e - (16 if n > 0 else 0) for n, e in enumerate(expected)]


def test_missing_directory_error_names_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        load_t5_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/model\.safetensors"):
        load_t5_encoder(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ torch reference


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def save_tokenizer(directory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))


def make_checkpoint(torch, directory, feed_forward_proj, model_class="T5EncoderModel", dtype=None, **overrides):
    """A random T5 saved with save_pretrained. Norm scales and the position bias are randomised too, so a wrong
    mapping of any tensor shows up in the outputs."""
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(**{**SMALL, **overrides}, feed_forward_proj=feed_forward_proj, dropout_rate=0.1)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(0.5 + torch.rand_like(param))
            if "relative_attention_bias" in name:
                param.copy_(torch.randn_like(param))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(directory))
    save_tokenizer(directory)
    return model


def torch_outputs(torch, model, directory):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(str(directory))(SENTENCES, padding="max_length", truncation=True,
                                                          max_length=MAX_LENGTH, return_tensors="pt")
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    with torch.no_grad():
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].numpy().astype(bool)
    return hidden.float().numpy() * mask[..., None], batch["input_ids"].numpy(), mask


def run_ours(encoder, directory, mesh=None):
    tokens = TextTokenizer(directory, MAX_LENGTH)(SENTENCES)
    context = sharding_context(mesh, DEFAULT_SHARDING_RULES) if mesh is not None else contextlib.nullcontext()
    with jax.default_matmul_precision("highest"), context:
        out, mask = nnx.jit(lambda m, ids, am: m(ids, am))(encoder, tokens["input_ids"], tokens["attention_mask"])
    return np.asarray(out.astype(jnp.float32)), np.asarray(mask), tokens


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_parity_with_torch_fp32_sharded(torch, tmp_path, devices, feed_forward_proj, measurement):
    model = make_checkpoint(torch, tmp_path, feed_forward_proj)
    reference, reference_ids, reference_mask = torch_outputs(torch, model, tmp_path)
    mesh = make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
    encoder = load_t5_encoder(tmp_path, mesh=mesh)
    # Loaded straight into shards: embed on fsdp, mlp/heads/vocab on tensor.
    assert encoder.blocks[0].ff.wi[...].sharding.spec == P("fsdp", "tensor")
    assert encoder.blocks[1].attention.query[...].sharding.spec == P("fsdp", "tensor")
    assert encoder.shared[...].sharding.spec == P("tensor", "fsdp")
    ours, mask, tokens = run_ours(encoder, tmp_path, mesh)  # activations constrained by their logical names too
    np.testing.assert_array_equal(tokens["input_ids"], reference_ids)
    np.testing.assert_array_equal(mask, reference_mask)
    assert mask[1].all() and not mask[3].all()  # one caption truncated, one padded
    error = float(np.max(np.abs(ours - reference)))
    scale = float(np.abs(reference).max())
    print(f"\nT5 {feed_forward_proj} fp32 parity: max abs diff {error:.3e} (output scale {scale:.2f})")
    measurement(f"T5 {feed_forward_proj} fp32 max abs diff vs PyTorch (output scale {scale:.2f})", error)
    assert error <= 1e-4


def test_buckets_match_hugging_face(torch):
    from transformers.models.t5.modeling_t5 import T5Attention

    for num_buckets, max_distance in ((32, 128), (16, 20), (8, 7)):
        relative = torch.arange(400)[None, :] - torch.arange(400)[:, None]
        expected = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=num_buckets,
                                                         max_distance=max_distance)
        ours = relative_position_buckets(400, 400, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, expected.numpy())


def test_padding_is_zeroed_and_ignored_and_bf16_is_close(torch, tmp_path):
    make_checkpoint(torch, tmp_path, "gated-gelu")
    encoder = load_t5_encoder(tmp_path)
    reference, mask, tokens = run_ours(encoder, tmp_path)
    assert np.all(reference[~mask] == 0.0) and np.all(np.abs(reference[mask]).sum(-1) > 0)
    # Real positions cannot see what sits in padded slots.
    scrambled = np.where(tokens["attention_mask"], tokens["input_ids"], 7)
    with jax.default_matmul_precision("highest"):
        other, _ = encoder(jnp.asarray(scrambled), jnp.asarray(tokens["attention_mask"]))
    np.testing.assert_allclose(np.asarray(other), reference, atol=1e-5)

    low = load_t5_encoder(tmp_path, dtype=jnp.bfloat16)
    assert low.shared[...].dtype == jnp.float32  # parameters stay fp32; only compute is bf16
    out, _ = nnx.jit(lambda m, ids, am: m(ids, am))(low, tokens["input_ids"], tokens["attention_mask"])
    assert out.dtype == jnp.bfloat16
    relative = float(np.linalg.norm(np.asarray(out, np.float32) - reference) / np.linalg.norm(reference))
    print(f"\nT5 bf16 vs fp32: relative L2 error {relative:.3e}")
    assert relative < 3e-2


def test_full_t5_checkpoint_drops_decoder_and_lm_head(torch, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_checkpoint(torch, tmp_path, "relu", model_class="T5ForConditionalGeneration")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("decoder.") for k in tensors)
    # Hub files of the original t5-base also store the tied copies and the LM head.
    for key in ("lm_head.weight", "decoder.embed_tokens.weight", "encoder.embed_tokens.weight"):
        tensors[key] = tensors["shared.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reference, _, _ = torch_outputs(torch, model, tmp_path)
    ours, _, _ = run_ours(load_t5_encoder(tmp_path), tmp_path)
    assert float(np.max(np.abs(ours - reference))) <= 1e-4


def test_bf16_checkpoint_and_tied_embedding_copy(torch, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_checkpoint(torch, tmp_path, "relu", dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["shared.weight"].dtype == torch.bfloat16
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].clone()  # the layout of older hub files
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    encoder = load_t5_encoder(tmp_path)
    assert encoder.shared[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(encoder.shared[...]), model.shared.weight.detach().float().numpy())
    wo = model.encoder.block[2].layer[1].DenseReluDense.wo.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(encoder.blocks[2].ff.wo[...]), wo.T)


def test_missing_and_unexpected_keys_are_listed(torch, tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(torch, tmp_path, "relu")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    tensors["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] = torch.zeros(128, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(DataError, match=r"blocks\.1\.ff\.wo.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0"):
        load_t5_encoder(tmp_path)


def test_non_finite_tensor_is_refused_with_its_name(torch, tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(torch, tmp_path, "relu")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "encoder.block.1.layer.0.SelfAttention.k.weight"
    tensors[key][2, 3] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(DataError, match=rf"model\.safetensors: tensor {key} .*\(1 NaN of"):
        load_t5_encoder(tmp_path)


def test_config_loader_checks_sizes_against_checkpoint(torch, tmp_path):
    make_checkpoint(torch, tmp_path, "gated-gelu")
    section = ml_collections.ConfigDict(dict(name="t5", path=str(tmp_path), max_length=MAX_LENGTH, dtype="float32",
                                             feed_forward_proj="gated-gelu", **SMALL))
    encoder, tokenizer = load_text_encoder(section, nnx.Rngs(0))
    assert encoder.config.d_ff == SMALL["d_ff"] and tokenizer.max_length == MAX_LENGTH
    section.d_ff = 256
    with pytest.raises(ConfigError, match=r"config\.text_encoder\.d_ff=256: the checkpoint .* has 128"):
        load_text_encoder(section, nnx.Rngs(0))


def test_t5_base_count_matches_torch(torch):
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):  # shapes only: no memory, no init
        model = T5EncoderModel(T5Config(**T5_BASE))
    # parameters() yields the tied shared / embed_tokens weight once.
    reference = sum(p.numel() for p in model.parameters())
    ours = nnx.state(nnx.eval_shape(lambda: T5Encoder(T5EncoderConfig(**T5_BASE), rngs=nnx.Rngs(0))), nnx.Param)
    assert reference == 109_628_544
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours)) == reference

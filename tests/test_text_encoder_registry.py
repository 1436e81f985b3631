"""The text-encoder registry: a kind registered by one class is what every stage dispatches to; unknown names fail
with the config key and the registered names."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data_pipelines.latent_source import CropAndSample
from musicdiff.errors import ConfigError
from musicdiff.inference.prompts import PromptEncoder
from musicdiff.models import registry as model_registry
from musicdiff.models.conditioning import build_conditioner
from musicdiff.models.text_encoder import (FrozenEmbeddingsKind, load_text_encoder, prompt_from_batch,
                                           register_text_encoder, text_encoder_kind, text_encoder_names)
from musicdiff.models.text_encoder import registry as text_registry
from musicdiff.parallel import DEFAULT_SHARDING_RULES

VOCAB, WIDTH, MAX_LENGTH = 7, 3, 4


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    d_model: int


class ToyEncoder(nnx.Module):
    """Bag of word embeddings: (ids, mask) -> (table[ids] * mask, mask)."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.config = ToyConfig(width)
        self.table = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, width)))

    def __call__(self, input_ids, attention_mask):
        mask = attention_mask.astype(bool)
        return jnp.take(self.table[...], input_ids, axis=0) * mask[..., None], mask


class ToyTokenizer:
    """Word length mod VOCAB per word, right-padded to max_length."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, texts):
        ids = np.zeros((len(texts), self.max_length), np.int32)
        mask = np.zeros((len(texts), self.max_length), bool)
        for row, text in enumerate(texts):
            words = text.split()[: self.max_length]
            ids[row, : len(words)] = [len(word) % VOCAB for word in words]
            mask[row, : len(words)] = True
        return {"input_ids": ids, "attention_mask": mask}


class ToyBagKind(FrozenEmbeddingsKind):
    name = "toy_bag"

    def build(self, section, rngs):
        return ToyEncoder(int(section.width), rngs)

    def load(self, section, rngs, *, mesh=None, rules=DEFAULT_SHARDING_RULES):
        return ToyEncoder(int(section.width), nnx.Rngs(int(section.seed))), ToyTokenizer(int(section.max_length))

    def conditioner_encoder(self, entry_id, config, rngs, dtype):
        return int(config["width"]), None

    def embedding_dim(self, section):
        return int(section.width)

    def checkpoint_id(self, section):
        return f"toy-seed-{section.seed}"


@pytest.fixture
def toy_kind(monkeypatch):
    """ToyBagKind registered for this test only (both registries are restored afterwards)."""
    monkeypatch.setattr(text_registry, "_KINDS", dict(text_registry._KINDS))
    monkeypatch.setattr(model_registry, "_BUILDERS", dict(model_registry._BUILDERS))
    register_text_encoder(ToyBagKind)
    return text_encoder_kind("toy_bag")


def toy_section():
    return ml_collections.ConfigDict(dict(name="toy_bag", width=WIDTH, max_length=MAX_LENGTH, seed=3))


def test_a_registered_kind_is_what_every_stage_dispatches_to(toy_kind, tmp_path):
    section = toy_section()
    assert isinstance(toy_kind, ToyBagKind) and "toy_bag" in text_encoder_names()
    expected_encoder, tokenizer = ToyBagKind().load(section, nnx.Rngs(0))
    prompts = ["a bb ccc", "dddd"]
    tokens = tokenizer(prompts)
    expected, expected_mask = expected_encoder(jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]))

    # load / build: load_text_encoder and the model registry (launch.describe) reach the toy kind.
    encoder, loaded_tokenizer = load_text_encoder(section, nnx.Rngs(0))
    assert isinstance(encoder, ToyEncoder) and isinstance(loaded_tokenizer, ToyTokenizer)
    assert isinstance(model_registry.build(section, nnx.Rngs(0)), ToyEncoder)

    # tokenize + encode at generation: the PromptEncoder gives the frozen encoder's outputs.
    encoded = PromptEncoder(section)(prompts)
    np.testing.assert_allclose(encoded["embeddings"], np.asarray(expected), rtol=1e-6)
    np.testing.assert_array_equal(encoded["mask"], np.asarray(expected_mask))

    # precompute: each caption's embeddings of its real tokens, and the manifest entry.
    fields = toy_kind.caption_fields(section, tmp_path, mesh=None, rules=DEFAULT_SHARDING_RULES, batch_size=2,
                                     dtype=np.float32)(prompts)
    assert fields["a bb ccc"]["prompt_embeddings"].shape == (3, WIDTH)
    np.testing.assert_allclose(fields["dddd"]["prompt_embeddings"], np.asarray(expected[1, :1]), rtol=1e-6)
    entry = toy_kind.manifest_entry(section, tmp_path)
    assert entry == {"name": "toy_bag", "id": "toy-seed-3", "config": section.to_dict(), "max_length": MAX_LENGTH,
                     "embedding_dim": WIDTH}

    # training: latent records padded to max_length by the kind, batch keys back to conditioner inputs.
    manifest = {"downsampling_ratio": 8, "sample_rate": 64, "text_encoder": entry}
    record = {"latent_mean": np.zeros((2, 5), np.float32), "latent_mask": np.ones(5, bool), "offset": 0,
              "seconds_total": 1.0, "caption": "dddd", **fields["dddd"]}
    example = CropAndSample(5, manifest).random_map(record, np.random.default_rng(0))
    assert example["prompt_embeddings"].shape == (MAX_LENGTH, WIDTH)
    np.testing.assert_array_equal(example["prompt_mask"], [True, False, False, False])
    prompt = prompt_from_batch({key: value[None] for key, value in example.items() if key.startswith("prompt_")})
    assert sorted(prompt) == ["embeddings", "mask"]

    # the conditioner: the kind's width, no owned encoder (the toy encoder is frozen).
    conditioner = build_conditioner({"id": "prompt", "type": "toy_bag", "config": {"width": WIDTH}}, 8, nnx.Rngs(0))
    assert conditioner.dim == WIDTH and conditioner.encoder is None


def test_an_unknown_text_encoder_names_the_key_and_the_registered_kinds():
    registered = ", ".join(text_encoder_names())
    assert registered == "embedded, t5, t5gemma"
    with pytest.raises(ConfigError, match=f"config.text_encoder.name='clap': no such text encoder; registered text "
                                          f"encoders: {registered}"):
        text_encoder_kind("clap")
    with pytest.raises(ConfigError, match="config.prompt_encoder.name='clap': no such text encoder"):
        PromptEncoder(ml_collections.ConfigDict(dict(name="clap")))
    with pytest.raises(ConfigError, match=f"type 'clap' is not supported; use number, beat_grid, "
                                          f"key_chroma or a text encoder \\({registered}\\)"):
        build_conditioner({"id": "prompt", "type": "clap", "config": {}}, 8, nnx.Rngs(0))
    manifest = {"downsampling_ratio": 8, "sample_rate": 64, "text_encoder": {"name": "clap", "max_length": 4}}
    with pytest.raises(ConfigError, match="manifest.json text_encoder.name='clap': no such text encoder"):
        CropAndSample(5, manifest)

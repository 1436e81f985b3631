"""Timing and text conditioning: NumberConditioner, SAO routing, CFG dropout, caption tokenizer and embedding cache."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.errors import ConfigError, DataError
from musicdiff.models.conditioning import MultiConditioner, NumberConditioner, null_condition
from musicdiff.models.text_encoder import (
    T5Encoder,
    T5EncoderConfig,
    build_caption_tokenizer,
    encode_captions,
    load_caption_tokenizer,
    load_text_encoder,
)

# These tests call bare modules; model code needs a declared layout (musicdiff/parallel/sharding.py).
pytestmark = pytest.mark.usefixtures("unsharded")

CAPTIONS = [
    "A calm piano melody with soft strings.",
    "Energetic drum & bass, 174 BPM!",
    "lo-fi hip hop beat",
    "Ambient pads; slow, dreamy (no drums).",
    "Solo violin — café style",
]

# The stable-audio-open-1.0 model_config.json conditioning block and routing (spec §8.1, §2.1).
SAO_CONDITIONING = {
    "configs": [
        {"id": "prompt", "type": "t5", "config": {"t5_model_name": "t5-base", "max_length": 128}},
        {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
        {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}},
    ],
    "cond_dim": 768,
}
SAO_ROUTING = dict(cross_attention_cond_ids=("prompt", "seconds_start", "seconds_total"),
                   global_cond_ids=("seconds_start", "seconds_total"))


def small_conditioning(dim=8):
    return {
        "configs": [
            {"id": "prompt", "type": "t5", "config": {"t5_model_name": "custom", "dim": dim}},
            {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
            {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}},
        ],
        "cond_dim": dim,
    }


def count(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_number_conditioner_clamps_and_normalises():
    cond = NumberConditioner(768, 0.0, 512.0, rngs=nnx.Rngs(0))
    assert count(cond) == 128 + 257 * 768 + 768 == 198_272  # spec §2.7, per number conditioner
    np.testing.assert_allclose(np.asarray(cond.normalise(jnp.array([-10.0, 0.0, 128.0, 512.0, 600.0]))),
                               [0.0, 0.0, 0.25, 1.0, 1.0])
    tokens, mask = cond(jnp.array([-10.0, 0.0, 47.5, 512.0, 1e4]))
    assert tokens.shape == (5, 1, 768) and mask.shape == (5, 1) and mask.dtype == bool and bool(mask.all())
    np.testing.assert_array_equal(np.asarray(tokens[0]), np.asarray(tokens[1]))  # below min == min
    np.testing.assert_array_equal(np.asarray(tokens[4]), np.asarray(tokens[3]))  # above max == max
    # By hand: [u, sin(2π u w), cos(2π u w)] @ W + b with u = 47.5 / 512.
    u = 47.5 / 512
    w = np.asarray(cond.frequencies[...], np.float64)
    features = np.concatenate([[u], np.sin(2 * math.pi * u * w), np.cos(2 * math.pi * u * w)])
    expected = features @ np.asarray(cond.kernel[...], np.float64) + np.asarray(cond.bias[...], np.float64)
    np.testing.assert_allclose(np.asarray(tokens[2, 0]), expected, rtol=1e-4, atol=1e-4)


def test_sao_layout_shapes_and_routing():
    conditioner = MultiConditioner(SAO_CONDITIONING, rngs=nnx.Rngs(0), **SAO_ROUTING)
    assert count(conditioner) == 2 * 198_272  # t5 is not part of the conditioner state, as in SAO
    batch = 3
    embeddings = jax.random.normal(jax.random.key(1), (batch, 128, 768))
    mask = jnp.arange(128)[None, :] < jnp.array([[5], [128], [40]])
    inputs = {"prompt": {"embeddings": embeddings, "mask": mask},
              "seconds_start": jnp.array([0.0, 10.0, 30.0]), "seconds_total": jnp.array([47.0, 20.0, 600.0])}
    cond = conditioner.condition(inputs)
    assert cond.cross_tokens.shape == (batch, 130, 768) and cond.cross_mask.shape == (batch, 130)
    assert cond.global_embed.shape == (batch, 1536)
    # Text tokens pass unprojected (768 == cond_dim) with pads zeroed; timing tokens follow, one each.
    np.testing.assert_array_equal(np.asarray(cond.cross_tokens[:, :128]), np.asarray(embeddings * mask[..., None]))
    np.testing.assert_array_equal(np.asarray(cond.cross_mask), np.concatenate([mask, np.ones((batch, 2), bool)], 1))
    start, _ = conditioner.conditioners["seconds_start"](inputs["seconds_start"])
    total, _ = conditioner.conditioners["seconds_total"](inputs["seconds_total"])
    np.testing.assert_array_equal(np.asarray(cond.cross_tokens[:, 128]), np.asarray(start[:, 0]))
    np.testing.assert_array_equal(np.asarray(cond.cross_tokens[:, 129]), np.asarray(total[:, 0]))
    np.testing.assert_array_equal(np.asarray(cond.global_embed),
                                  np.concatenate([np.asarray(start[:, 0]), np.asarray(total[:, 0])], -1))


def test_default_keys_and_config_errors():
    conditioning = {**small_conditioning(), "default_keys": {"seconds_start": "seconds_total"}}
    conditioner = MultiConditioner(conditioning, rngs=nnx.Rngs(0), **SAO_ROUTING)
    inputs = {"prompt": {"embeddings": jnp.ones((2, 4, 8)), "mask": jnp.ones((2, 4), bool)},
              "seconds_total": jnp.array([5.0, 9.0])}
    outputs = conditioner(inputs)
    np.testing.assert_array_equal(np.asarray(outputs["seconds_start"][0]), np.asarray(
        conditioner.conditioners["seconds_start"](inputs["seconds_total"])[0]))
    with pytest.raises(DataError, match="'seconds_start' is missing"):
        conditioner({"prompt": inputs["prompt"]})
    with pytest.raises(ConfigError, match="name no conditioner"):
        MultiConditioner(small_conditioning(), rngs=nnx.Rngs(0), cross_attention_cond_ids=("lyrics",))
    with pytest.raises(ConfigError, match="type 'clap_text' is not supported"):
        MultiConditioner({"configs": [{"id": "p", "type": "clap_text", "config": {}}], "cond_dim": 8},
                         rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def dropout_setup():
    conditioner = MultiConditioner(small_conditioning(), rngs=nnx.Rngs(0), **SAO_ROUTING)
    batch = 4000
    inputs = {"prompt": {"embeddings": 1.0 + jax.random.uniform(jax.random.key(2), (batch, 4, 8)),
                         "mask": jnp.ones((batch, 4), bool)},
              "seconds_start": jnp.linspace(0, 100, batch), "seconds_total": jnp.linspace(10, 500, batch)}
    condition = nnx.jit(lambda c, x, key, p: c.condition(x, key=key, cfg_dropout_prob=p), static_argnums=3)
    return conditioner, inputs, condition, condition(conditioner, inputs, None, 0.0)


def test_cfg_dropout_rate_and_null_condition(dropout_setup):
    conditioner, inputs, condition, full = dropout_setup
    cond = condition(conditioner, inputs, jax.random.key(7), 0.1)
    tokens = np.asarray(cond.cross_tokens)
    null = np.all(tokens == 0, axis=(1, 2))
    kept = np.all(tokens == np.asarray(full.cross_tokens), axis=(1, 2))
    assert np.all(null | kept)  # a sample drops its whole context or nothing (text and timing together)
    batch = tokens.shape[0]
    sigma = math.sqrt(0.1 * 0.9 / batch)
    print(f"\nCFG dropout: {null.mean():.4f} of {batch} samples null (p=0.1, sigma {sigma:.4f})")
    assert abs(null.mean() - 0.1) < 4 * sigma
    # The mask and the global (timing) embedding are never dropped.
    np.testing.assert_array_equal(np.asarray(cond.cross_mask), np.asarray(full.cross_mask))
    np.testing.assert_array_equal(np.asarray(cond.global_embed), np.asarray(full.global_embed))
    # A pure function of the key.
    again = condition(conditioner, inputs, jax.random.key(7), 0.1)
    np.testing.assert_array_equal(np.asarray(again.cross_tokens), tokens)
    other = np.all(np.asarray(condition(conditioner, inputs, jax.random.key(8), 0.1).cross_tokens) == 0, axis=(1, 2))
    assert not np.array_equal(other, null)

    empty = null_condition(full)
    assert np.all(np.asarray(empty.cross_tokens) == 0) and empty.cross_tokens.shape == full.cross_tokens.shape
    np.testing.assert_array_equal(np.asarray(empty.cross_mask), np.asarray(full.cross_mask))
    np.testing.assert_array_equal(np.asarray(empty.global_embed), np.asarray(full.global_embed))


def test_zero_dropout_never_nulls_and_per_condition_dropout(dropout_setup):
    conditioner, inputs, condition, full = dropout_setup
    cond = condition(conditioner, inputs, jax.random.key(3), 0.0)
    np.testing.assert_array_equal(np.asarray(cond.cross_tokens), np.asarray(full.cross_tokens))
    assert not np.any(np.all(np.asarray(full.cross_tokens) == 0, axis=(1, 2)))
    # Independent per-condition probabilities: only the prompt tokens are ever dropped here.
    outputs = conditioner(inputs)
    from musicdiff.models.conditioning import cfg_drop_masks

    dropped = cfg_drop_masks(jax.random.key(4), 4000, {"prompt": 0.5}, conditioner.cross_attention_cond_ids)
    cond = conditioner.route(outputs, dropped)
    text_null = np.all(np.asarray(cond.cross_tokens[:, :4]) == 0, axis=(1, 2))
    assert abs(text_null.mean() - 0.5) < 4 * math.sqrt(0.25 / 4000)
    np.testing.assert_array_equal(np.asarray(cond.cross_tokens[:, 4:]), np.asarray(full.cross_tokens[:, 4:]))


def test_caption_tokenizer_round_trip(tmp_path):
    directory = build_caption_tokenizer(CAPTIONS * 3, tmp_path / "tok", vocab_size=400)
    tokenizer = load_caption_tokenizer(directory, max_length=48)
    assert len(tokenizer) <= 400
    batch = tokenizer(CAPTIONS)
    assert batch["input_ids"].shape == (len(CAPTIONS), 48) and batch["input_ids"].dtype == np.int32
    for caption, ids, mask in zip(CAPTIONS, batch["input_ids"], batch["attention_mask"]):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert ids[length - 1] == 1 and np.all(ids[length:] == 0)  # </s> appended, then <pad> = 0
        assert tokenizer.decode(ids) == caption  # byte-level BPE is lossless, unicode included
    short = load_caption_tokenizer(directory, max_length=4)(CAPTIONS)
    assert short["input_ids"].shape == (len(CAPTIONS), 4) and short["attention_mask"].all()
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_caption_tokenizer(tmp_path / "missing", 8)


def test_split_digits_gives_every_digit_its_own_token(tmp_path):
    captions = [f"a calm piece in C major at {bpm} BPM" for bpm in range(70, 161)] * 2
    for split, expected in ((True, [" ", "1", "4", "7", " BPM"]), (False, None)):
        directory = build_caption_tokenizer(captions, tmp_path / f"tok{split}", vocab_size=320, split_digits=split)
        tokenizer = load_caption_tokenizer(directory, max_length=16)
        ids = tokenizer(["at 147 BPM"])["input_ids"][0]
        pieces = [tokenizer.tokenizer.decode([i]) for i in ids if i > 1]
        assert tokenizer.decode(ids) == "at 147 BPM"
        if split:
            assert pieces[1:] == expected
        else:  # whole-number BPE merges: "147" is not three digit tokens
            assert not {"1", "4", "7"} <= set(pieces)


def test_embedded_encoder_trains_through_conditioner_and_frozen_t5_does_not(tmp_path):
    directory = build_caption_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=320)
    tokenizer = load_caption_tokenizer(directory, max_length=16)
    # The sizes of the next test, so that their eager initialisers compile once.
    encoder_sizes = dict(vocab_size=320, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                         feed_forward_proj="gated-gelu")
    conditioning = {"configs": [{"id": "prompt", "type": "embedded", "config": encoder_sizes},
                                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 256}}],
                    "cond_dim": 24}
    conditioner = MultiConditioner(conditioning, rngs=nnx.Rngs(0), cross_attention_cond_ids=("prompt", "seconds_total"),
                                   global_cond_ids=("seconds_total",))
    tokens = tokenizer(CAPTIONS[:3])
    inputs = {"prompt": {k: jnp.asarray(v) for k, v in tokens.items()}, "seconds_total": jnp.array([5.0, 10.0, 300.0])}
    # Jitted: op-by-op dispatch through the encoder and its gradient is what would make this test slow.
    cond = nnx.jit(lambda c, x: c.condition(x))(conditioner, inputs)
    assert cond.cross_tokens.shape == (3, 17, 24) and cond.global_embed.shape == (3, 24)
    pads = ~np.asarray(cond.cross_mask[:, :16])
    assert pads.any() and np.all(np.asarray(cond.cross_tokens[:, :16])[pads] == 0)

    grads = nnx.jit(lambda c, x: nnx.grad(lambda m: jnp.sum(m.condition(x).cross_tokens ** 2))(c))(conditioner, inputs)
    assert float(jnp.abs(grads["conditioners"]["prompt"]["encoder"]["shared"][...]).sum()) > 0

    frozen = T5Encoder(T5EncoderConfig(**{**encoder_sizes, "d_model": 8}), rngs=nnx.Rngs(1))
    t5_style = MultiConditioner(small_conditioning(), rngs=nnx.Rngs(0), **SAO_ROUTING)
    inputs = {**inputs, "seconds_start": jnp.zeros(3)}

    @nnx.jit
    def frozen_grads(enc, c, x):
        return nnx.grad(lambda e: jnp.sum(c.condition(x, encoders={"prompt": e}).cross_tokens))(enc)

    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(frozen_grads(frozen, t5_style, inputs)))


def test_encode_captions_once_each_and_config_loader(tmp_path, repo_root):
    directory = build_caption_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=320)
    config = load_config(f"{repo_root}/configs/text_encoder.py:embedded",
                         [f"text_encoder.tokenizer_path={directory}", "text_encoder.vocab_size=320",
                          "text_encoder.num_layers=2", "text_encoder.d_model=16", "text_encoder.d_ff=32",
                          "text_encoder.d_kv=8", "text_encoder.num_heads=2",
                          "text_encoder.max_length=12"])
    encoder, tokenizer = load_text_encoder(config.text_encoder, nnx.Rngs(0))
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[2], CAPTIONS[1]]
    cache = encode_captions(captions, tokenizer, encoder, batch_size=2, dtype=jnp.bfloat16)
    assert cache.embeddings.shape == (3, 12, 16) and cache.embeddings.dtype == jnp.bfloat16
    assert cache.index == {CAPTIONS[0]: 0, CAPTIONS[1]: 1, CAPTIONS[2]: 2}
    direct, mask = encoder(*map(jnp.asarray, tokenizer(CAPTIONS[:3]).values()))
    np.testing.assert_allclose(cache.embeddings.astype(np.float32), np.asarray(direct), atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(cache.mask, np.asarray(mask))
    emb, got_mask = cache.lookup(captions)
    assert emb.shape == (5, 12, 16) and np.array_equal(emb[2], emb[0]) and np.array_equal(got_mask[4], got_mask[1])

    with config.unlocked():
        config.text_encoder.vocab_size = 100
    with pytest.raises(ConfigError, match="vocab_size=100"):
        load_text_encoder(config.text_encoder, nnx.Rngs(0))
    with pytest.raises(ConfigError, match="text_encoder.name='clap': no such text encoder; registered text encoders: "
                                         "embedded, t5"):
        load_text_encoder(ml_collections.ConfigDict(dict(name="clap")), nnx.Rngs(0))

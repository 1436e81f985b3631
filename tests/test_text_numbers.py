"""The embedded encoder's number embedding: digit runs read in base 10, the digit ids taken from the run's tokenizer,
and the path latents -> training -> checkpoint -> generation keeping them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.models.text_encoder import T5Encoder, T5EncoderConfig, build_caption_tokenizer, load_caption_tokenizer
from musicdiff.models.text_encoder.numbers import NumberAwareT5Encoder, digit_token_ids, number_values

SIZES = dict(vocab_size=320, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")
CAPTIONS = [f"a calm piece in C major at {bpm} BPM" for bpm in range(70, 161, 10)] * 2


def test_number_values_give_every_digit_of_a_run_the_runs_value():
    digit_ids = list(range(10, 20))  # token 10 + d is the digit d
    d = lambda text: [10 + int(c) for c in text]
    ids = np.array([[5, *d("130"), 6, *d("7"), 7, 8, 0, 0],
                    [*d("2026"), 9, *d("05"), 3, 0, 0]])
    values, is_digit = number_values(jnp.asarray(ids), digit_ids)
    expected = np.array([[0, 130, 130, 130, 0, 7, 0, 0, 0, 0],
                         [2026, 2026, 2026, 2026, 0, 5, 5, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(values), expected)
    np.testing.assert_array_equal(np.asarray(is_digit), (ids >= 10) & (ids < 20))


def test_digit_ids_come_from_a_tokenizer_that_splits_digits(tmp_path):
    split = load_caption_tokenizer(build_caption_tokenizer(CAPTIONS, tmp_path / "split", 320, split_digits=True), 16)
    ids = digit_token_ids(split, "tok")
    assert [split.tokenizer.convert_ids_to_tokens(i) for i in ids] == list("0123456789")
    whole = load_caption_tokenizer(build_caption_tokenizer(CAPTIONS, tmp_path / "whole", 320), 16)
    with pytest.raises(ConfigError, match="split_digits=True"):
        digit_token_ids(whole, "tok")


@pytest.mark.usefixtures("unsharded")
def test_number_features_reach_digit_tokens_only():
    config = T5EncoderConfig.from_mapping(SIZES)
    digit_ids = list(range(10, 20))
    aware = NumberAwareT5Encoder(config, number_max=256, digit_ids=digit_ids, rngs=nnx.Rngs(0))
    plain = T5Encoder(config, rngs=nnx.Rngs(1))
    nnx.update(plain, {k: v for k, v in nnx.state(aware, nnx.Param).items() if k != "numbers"})
    mask = jnp.ones((1, 6), bool)
    words = jnp.array([[3, 4, 5, 6, 7, 1]])
    np.testing.assert_array_equal(np.asarray(aware(words, mask)[0]), np.asarray(plain(words, mask)[0]))
    number = jnp.array([[3, 4, 11, 13, 10, 1]])  # "... 130 </s>"
    # The offset on each digit is the NumberConditioner token of 130, on the other tokens nothing.
    token, _ = aware.numbers(jnp.array([130.0]))
    offsets = jnp.zeros((1, 6, SIZES["d_model"])).at[0, 2:5].set(token[0, 0])
    np.testing.assert_allclose(np.asarray(aware(number, mask)[0]),
                               np.asarray(plain(number, mask, token_offsets=offsets)[0]), rtol=1e-6, atol=1e-6)
    other = aware(jnp.array([[3, 4, 11, 14, 10, 1]]), mask)[0]  # 140
    assert not np.allclose(np.asarray(other), np.asarray(aware(number, mask)[0]))


@pytest.mark.usefixtures("unsharded")
def test_without_digit_ids_the_encoder_says_where_they_come_from():
    aware = NumberAwareT5Encoder(T5EncoderConfig.from_mapping(SIZES), number_max=256, digit_ids=None,
                                 rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="digit_ids"):
        aware(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool))


@pytest.fixture(scope="module")
def split_digit_latents(tmp_path_factory):
    from musicdiff.inference.precompute import precompute_latents
    from tests.precompute_fixtures import precompute_config, save_autoencoder, write_audio_folder

    base = tmp_path_factory.mktemp("number_latents")
    root = write_audio_folder(base / "audio")
    out = base / "latents"
    precompute_latents(precompute_config(save_autoencoder(base / "autoencoder"), root,
                                         "text_encoder.split_digits=True"), out)
    return out


def test_training_takes_the_digit_ids_from_the_latents_and_generation_uses_them(split_digit_latents, tmp_path):
    from musicdiff.inference.generate import Generator
    from musicdiff.training.runner import train

    config = load_config("configs/diffusion.py:tiny", [f"data.latents={split_digit_latents}", "training.num_steps=2",
                                                       "training.checkpoint_every=2", "batch_size=8"])
    config.unlock()
    config.conditioner.conditioning.configs[0]["config"]["number_max"] = 256.0
    train(config, tmp_path / "run", default_trainer="diffusion")

    tokenizer = load_caption_tokenizer(split_digit_latents / "tokenizer", 16)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["conditioner"]["conditioning"]["configs"][0]["config"]["digit_ids"] == \
        digit_token_ids(tokenizer, "latents")

    generator = Generator.from_checkpoint(str(tmp_path / "run"))
    from musicdiff.parallel.sharding import unsharded

    conditioner = nnx.merge(generator.graphdefs["conditioner"], generator.params["conditioner"])
    encoder = conditioner.conditioners["prompt"].encoder
    assert isinstance(encoder, NumberAwareT5Encoder) and encoder.digit_ids == tuple(digit_token_ids(tokenizer, "x"))
    # Two prompts that differ only in their number reach the DiT as different tokens at the digits, equal elsewhere.
    tokens = generator.prompt_encoder(["a song at 120 BPM", "a song at 150 BPM"])
    with unsharded():
        embeddings, _ = encoder(jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]))
    assert not np.allclose(np.asarray(embeddings[0]), np.asarray(embeddings[1]))
    assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.isfinite(x).all()), nnx.state(encoder, nnx.Param)))

"""Variable length, model side: the DiT's padding mask keeps padded frames out of the real frames' outputs (spec
§3.4), on both attention paths and with patches; without a mask nothing changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.models import registry
from musicdiff.models.attention import heads_major_attention
from musicdiff.models.denoiser import PADDING_MASK, ConditioningInputs, capabilities
from tests.test_dit import inputs, model_config, randomize

pytestmark = pytest.mark.usefixtures("unsharded")


@nnx.jit
def masked_forward(model, x, t, cross, mask, glob, padding_mask):
    return model(x, t, ConditioningInputs(cross, mask, glob), padding_mask=padding_mask)


@nnx.jit
def unmasked_forward(model, x, t, cross, mask, glob):
    return model(x, t, ConditioningInputs(cross, mask, glob))


def tiny_dit(**overrides):
    return randomize(registry.build(model_config("tiny", **overrides), nnx.Rngs(0)))


def valid_lengths_mask(lengths, total):
    return jnp.asarray(np.arange(total)[None, :] < np.asarray(lengths)[:, None])


def with_junk_in_padding(x, padding_mask, seed=99):
    junk = 100.0 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
    return jnp.where(padding_mask[:, None, :], x, junk)


@pytest.mark.parametrize("overrides", [dict(attention_implementation="auto"),
                                       dict(attention_implementation="xla"),
                                       dict(attention_implementation="auto", patch_size=2),
                                       dict(attention_implementation="xla", block_type="adaln_zero")],
                         ids=["heads_major", "dot_product_attention", "patch2", "adaln_zero"])
def test_real_frames_ignore_what_padded_frames_hold(overrides):
    model = tiny_dit(**overrides)
    assert PADDING_MASK in capabilities(model)
    x, t, cross, mask, glob = inputs(length=16)
    padding_mask = valid_lengths_mask([11, 16], 16)  # 11 real frames: with patches of 2, token 5 is half padding
    clean = masked_forward(model, x, t, cross, mask, glob, padding_mask)
    junked = masked_forward(model, with_junk_in_padding(x, padding_mask), t, cross, mask, glob, padding_mask)
    real = np.asarray(padding_mask)[:, None, :]
    np.testing.assert_allclose(np.where(real, junked, 0.0), np.where(real, clean, 0.0), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(clean[0, :, :11])).max() > 1e-3  # the model's output is not trivially zero


def test_masked_output_equals_the_output_of_the_real_frames_alone():
    """A clip padded with junk gives, on its real frames, what the unpadded clip gives (rotary positions are
    relative, and the padded keys are gone)."""
    model = tiny_dit()
    x, t, cross, mask, glob = inputs(length=16)
    padding_mask = valid_lengths_mask([10, 10], 16)
    padded = masked_forward(model, with_junk_in_padding(x, padding_mask), t, cross, mask, glob, padding_mask)
    alone = unmasked_forward(model, x[:, :, :10], t, cross, mask, glob)
    np.testing.assert_allclose(padded[:, :, :10], alone, atol=1e-5, rtol=0)


def test_an_all_real_mask_changes_nothing():
    model = tiny_dit()
    x, t, cross, mask, glob = inputs(length=16)
    plain = unmasked_forward(model, x, t, cross, mask, glob)
    full = masked_forward(model, x, t, cross, mask, glob, jnp.ones((2, 16), bool))
    np.testing.assert_allclose(full, plain, atol=1e-6, rtol=0)


def test_heads_major_attention_masks_keys_like_dropping_them():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 4)), jnp.float32) for _ in range(3))
    key_mask = jnp.asarray([[True, True, True, False, False]])
    masked = heads_major_attention(q, k, v, key_mask[:, None, None, :])
    dropped = heads_major_attention(q, k[:, :3], v[:, :3])
    np.testing.assert_allclose(masked, dropped, atol=1e-6, rtol=0)
    reference = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], implementation="xla")
    np.testing.assert_allclose(masked, reference, atol=1e-6, rtol=0)

"""Variable length (spec §3.4, §4): the DiT's padding mask keeps padded frames out of the real frames' outputs, on
both attention paths and with patches; the loss is per sample over valid frames; a train step on a latent-source
batch of mixed lengths does not see what the padding holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.latent_source import latent_training_dataset
from musicdiff.config import load_config
from musicdiff.diffusion.objectives import masked_mse
from musicdiff.models import attention as attention_module
from musicdiff.models import registry
from musicdiff.models.attention import heads_major_attention
from musicdiff.models.denoiser import PADDING_MASK, ConditioningInputs, capabilities
from tests.test_dit import inputs, model_config, randomize
from tests.test_latent_source import CHANNELS, write_latents
from tests.model_fixtures import diffusion_step_on_one_device

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
                                       dict(attention_implementation="xla", block_type="adaln_zero"),
                                       dict(remat="full")],
                         ids=["heads_major", "dot_product_attention", "patch2", "adaln_zero", "remat"])
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


@pytest.mark.parametrize("per_head", [False, True], ids=["batched", "head_by_head"])
def test_heads_major_attention_masks_keys_like_dropping_them(per_head, monkeypatch):
    if per_head:  # the long-sequence path (one head at a time), forced at this size
        monkeypatch.setattr(attention_module, "PER_HEAD_SCORES_BYTES", 0)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 4)), jnp.float32) for _ in range(3))
    key_mask = jnp.asarray([[True, True, True, False, False]])
    masked = heads_major_attention(q, k, v, key_mask[:, None, None, :])
    dropped = heads_major_attention(q, k[:, :3], v[:, :3])
    np.testing.assert_allclose(masked, dropped, atol=1e-6, rtol=0)
    reference = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], implementation="xla")
    np.testing.assert_allclose(masked, reference, atol=1e-6, rtol=0)


def test_masked_loss_is_per_sample_then_batch_mean():
    """Sample 0: squared error 1 on its 2 valid frames, sample 1: 4 on its 3; junk (1e6) in the padding. Per-sample
    means 1 and 4 give 2.5 (the pooled mean over all 15 valid values would be 2.8)."""
    mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    error = jnp.where(mask[:, None, :], jnp.asarray([1.0, 2.0])[:, None, None], 1e3) * jnp.ones((2, 3, 4))
    assert float(masked_mse(error, jnp.zeros((2, 3, 4)), mask)) == pytest.approx(2.5, rel=1e-7)


@pytest.fixture(scope="module")
def mixed_length_batch(tmp_path_factory):
    """One batch of the latent source with clips of different lengths zero-padded to 20 frames."""
    directory = write_latents(tmp_path_factory.mktemp("latents"), text="embedded")
    batch = next(iter(latent_training_dataset(directory, latent_length=20, batch_size=4, seed=0, shuffle_seed=0,
                                              process_index=0, process_count=1, num_epochs=1)))
    batch = {key: value for key, value in batch.items() if key != "caption"}
    batch["latents"] = batch["latents"] / 1000.0  # the fixture's values say where they came from; keep them O(1)
    return batch


@pytest.mark.usefixtures("devices")
@pytest.mark.parametrize("mask_padding", [True, False])
def test_one_train_step_on_mixed_lengths_ignores_the_padding(mixed_length_batch, mask_padding):
    lengths = mixed_length_batch["padding_mask"].sum(axis=-1)
    assert len(set(lengths.tolist())) > 1 and lengths.max() < 20
    config = load_config("configs/diffusion.py:tiny", [f"model.io_channels={CHANNELS}", "data.latent_length=20",
                                                       f"objective.mask_padding={mask_padding}",
                                                       "objective.name=rectified_flow"])
    trainer, state, step = diffusion_step_on_one_device(config)
    state["params"]["model"] = nnx.state(randomize(nnx.merge(trainer.graphdefs["model"], state["params"]["model"])),
                                         nnx.Param)

    junked = dict(mixed_length_batch)
    padded = mixed_length_batch["padding_mask"][:, None, :] == 0
    junked["latents"] = np.where(padded, 50.0, mixed_length_batch["latents"]).astype(np.float32)
    _, metrics = step(state, mixed_length_batch)
    _, junk_metrics = step(state, junked)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["update_skipped"]) == 0.0
    if mask_padding:  # neither the loss nor the gradients see the padded frames
        assert float(junk_metrics["loss"]) == pytest.approx(float(metrics["loss"]), abs=1e-6)
        assert float(junk_metrics["grad_norm"]) == pytest.approx(float(metrics["grad_norm"]), rel=1e-5)
    else:
        assert abs(float(junk_metrics["loss"]) - float(metrics["loss"])) > 1e-2

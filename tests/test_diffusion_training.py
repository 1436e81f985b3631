"""Diffusion train step: sharded == single device, NaN guard, EMA and optimiser behaviour, loss goes down."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicdiff.config import load_config
from musicdiff.parallel import mesh_and_rules
from musicdiff.parallel.sharding import sharding_context
from musicdiff.training import loop
from musicdiff.training.diffusion import DiffusionTrainer
from musicdiff.training.optim import ema_decay, inverse_lr
from tests.model_fixtures import diffusion_step_on_one_device


def synthetic_batch(config, batch_size=8, seed=0, embedded=True):
    rng = np.random.default_rng(seed)
    channels, length = config.model.io_channels, config.data.latent_length
    tokens = 32
    batch = {
        "latents": rng.normal(size=(batch_size, channels, length)).astype(np.float32),
        "padding_mask": np.ones((batch_size, length), np.float32),
        "seconds_start": rng.uniform(0, 5, batch_size).astype(np.float32),
        "seconds_total": rng.uniform(5, 30, batch_size).astype(np.float32),
    }
    lengths = rng.integers(4, tokens, batch_size)
    batch["prompt_input_ids"] = rng.integers(3, 1000, (batch_size, tokens)).astype(np.int32)
    batch["prompt_attention_mask"] = np.arange(tokens)[None, :] < lengths[:, None]
    return batch


def two_steps(batch, mesh_shape, devices):
    config = load_config("configs/diffusion.py:tiny", [f"mesh.{k}={v}" for k, v in mesh_shape.items()])
    mesh, rules = mesh_and_rules(config, devices)
    trainer = DiffusionTrainer(config)
    with sharding_context(mesh, rules):
        state, shardings = loop.init_state(trainer.init_state, mesh, rules, jax.random.key(0))
        step = loop.compile_step(trainer.train_step, shardings, loop.batch_shardings(batch, mesh, rules), mesh, rules)
        from musicdiff.parallel.sharding import shard_batch

        state, metrics = step(state, shard_batch(batch, mesh, rules))
        state, metrics2 = step(state, shard_batch(batch, mesh, rules))
    return state, [metrics, metrics2], shardings


def test_sharded_step_equals_single_device(devices):
    config = load_config("configs/diffusion.py:tiny")
    batch = synthetic_batch(config)
    single, m1, _ = two_steps(batch, dict(data=1, fsdp=1, tensor=1, sequence=1), devices[:1])
    sharded, m8, shardings = two_steps(batch, dict(data=2, fsdp=4, tensor=1, sequence=1), devices)
    for a, b in zip(m1, m8):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * max(1.0, abs(float(a["loss"])))
    diffs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(single["params"]),
                                                            jax.tree.leaves(sharded["params"]))]
    assert max(diffs) < 1e-5
    sharded_leaves = [s for s in jax.tree.leaves(shardings["params"]) if s.spec != jax.sharding.PartitionSpec()]
    assert sharded_leaves, "fsdp=4 must shard some parameters"


FAST_LR = ["training.cfg_dropout_prob=0.0", "training.lr_warmup=0.5", "training.learning_rate=3e-3"]


@pytest.fixture(scope="module")
def single_device():
    """(config, initial state, jit'ed step) on one device, compiled once for the tests below."""
    config = load_config("configs/diffusion.py:tiny", FAST_LR)
    trainer, state, step = diffusion_step_on_one_device(config)

    return config, state, step


def test_nonfinite_batch_skips_the_update(single_device):
    config, state, step = single_device
    batch = synthetic_batch(config)
    poisoned = dict(batch, latents=np.full_like(batch["latents"], np.nan))
    before = {name: jax.tree.map(np.asarray, state[name]) for name in ("params", "ema")}
    after, metrics = step(state, poisoned)
    assert float(metrics["update_skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    for name in ("params", "ema"):
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            np.testing.assert_array_equal(a, np.asarray(b))
    assert int(after["step"]) == 1
    good, metrics = step(after, batch)
    assert float(metrics["update_skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))


def test_loss_falls_and_learning_rate_follows_inverse_lr(single_device):
    config, state, step = single_device
    batch = synthetic_batch(config, seed=1)
    # A learnable data distribution: every latent is one smooth pattern (the denoiser can memorise it).
    channels, length = batch["latents"].shape[1:]
    pattern = np.sin(np.arange(channels)[:, None] * 0.3 + np.arange(length)[None, :] * 0.2).astype(np.float32)
    batch["latents"] = np.broadcast_to(pattern, batch["latents"].shape).copy()
    losses, rates = [], []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        rates.append(float(metrics["learning_rate"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    training = config.training
    expected = inverse_lr(training.learning_rate, inv_gamma=training.lr_inv_gamma, power=training.lr_power,
                          warmup=training.lr_warmup)
    np.testing.assert_allclose(rates[:3], [float(expected(i)) for i in range(3)], rtol=1e-6)
    # Closed form of InverseLR at step 0: lr * (1 - warmup).
    assert rates[0] == pytest.approx(training.learning_rate * (1 - training.lr_warmup), rel=1e-6)


def test_ema_decay_matches_ema_pytorch_warmup():
    # ema_pytorch: 0 up to update_after_step, then 1 - (1 + (step - after - 1))^-power, capped at the max.
    assert float(ema_decay(1, update_after_step=1)) == 0.0
    assert float(ema_decay(2, update_after_step=1)) == 0.0
    assert float(ema_decay(3, update_after_step=1, power=0.75)) == pytest.approx(1 - 2 ** -0.75, rel=1e-6)
    assert float(ema_decay(10**9, max_decay=0.9999)) == pytest.approx(0.9999)


def test_sa3_tiny_trains_with_finite_loss():
    """Stable Audio 3's structure (:sa3_tiny: sa3_adaln blocks, memory tokens, the inpainting input, the expo
    seconds_total token and global vector) through the diffusion trainer: a few steps, finite losses."""
    config = load_config("configs/diffusion.py:sa3_tiny", FAST_LR)
    trainer, state, step = diffusion_step_on_one_device(config)

    losses = []
    for seed in range(3):
        state, metrics = step(state, synthetic_batch(config, seed=seed))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses

"""Inpainting-conditioned diffusion training (training/inpainting.py through the diffusion trainer): config checks,
the local input's layout, the loss's closed forms, a training step with the input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.diffusion.objectives import make_objective
from musicdiff.parallel import mesh_and_rules
from musicdiff.parallel.sharding import sharding_context, unsharded
from musicdiff.training import loop
from musicdiff.training.diffusion import DiffusionTrainer, conditioning_inputs
from musicdiff.training.inpainting import (InpaintingTraining, inpainting_loss, inpainting_training,
                                           local_condition)
from musicdiff.diffusion.timesteps import sample_timesteps
from tests.model_fixtures import diffusion_step_on_one_device

CHANNELS = 64  # configs/diffusion.py:tiny


def tiny_config(*overrides):
    return load_config("configs/diffusion.py:tiny", ["training.cfg_dropout_prob=0.0", *overrides])


def batch_of(config, batch_size=4, seed=0, valid_lengths=None):
    rng = np.random.default_rng(seed)
    length, tokens = config.data.latent_length, 16
    valid = np.ones((batch_size, length), np.float32)
    if valid_lengths is not None:
        valid = (np.arange(length)[None, :] < np.asarray(valid_lengths)[:, None]).astype(np.float32)
    return {
        "latents": rng.normal(size=(batch_size, CHANNELS, length)).astype(np.float32),
        "padding_mask": valid,
        "seconds_start": rng.uniform(0, 5, batch_size).astype(np.float32),
        "seconds_total": rng.uniform(5, 30, batch_size).astype(np.float32),
        "prompt_input_ids": rng.integers(3, 1000, (batch_size, tokens)).astype(np.int32),
        "prompt_attention_mask": np.arange(tokens)[None, :] < rng.integers(4, tokens, batch_size)[:, None],
    }


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"config.model.local_cond_dim=5: .* --config.model.local_cond_dim=65"):
        inpainting_training(tiny_config("model.local_cond_dim=5"))
    with pytest.raises(ConfigError, match="config.inpainting.mask_probabilities"):
        inpainting_training(tiny_config("model.local_cond_dim=65", "inpainting.mask_probabilities.full=0.0",
                                        "inpainting.mask_probabilities.causal=0.0",
                                        "inpainting.mask_probabilities.spans=0.0",
                                        "inpainting.mask_probabilities.segments=0.0"))
    with pytest.raises(ConfigError, match="config.inpainting.context_loss_weight=-1.0"):
        inpainting_training(tiny_config("model.local_cond_dim=65", "inpainting.context_loss_weight=-1.0"))
    assert inpainting_training(tiny_config()) is None  # local_cond_dim 0: trained without the input
    settings = inpainting_training(tiny_config("model.local_cond_dim=65"))
    assert settings.probabilities == pytest.approx((0.7, 0.1, 0.1, 0.1)) and settings.context_loss_weight == 0.0
    demo = load_config("configs/diffusion.py:demo", ["model.local_cond_dim=33"])
    assert demo.model.input_concat_dim == 36 and inpainting_training(demo).probabilities[0] == pytest.approx(0.7)


def test_local_input_is_the_keep_mask_then_the_kept_latents():
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 10)), jnp.float32)
    valid = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [6], [0]]), jnp.float32)
    local, keep, types = local_condition(jax.random.key(0), x0, valid, InpaintingTraining((0.0, 1.0, 0.0, 0.0)))
    assert local.shape == (3, 5, 10) and np.all(np.asarray(types) == 1)
    np.testing.assert_array_equal(local[:, 0], keep)
    np.testing.assert_array_equal(local[:, 1:], x0 * keep[:, None])
    assert not np.asarray(keep)[np.asarray(valid) == 0].any()  # padding is never context


class SquaredError:
    """An objective's loss: the global mean of squared error over the masked frames (diffusion/objectives.py)."""

    @staticmethod
    def loss(output, target, mask):
        err = (output - target) ** 2
        weight = jnp.broadcast_to(mask[:, None, :], err.shape)
        return jnp.sum(err * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def test_loss_closed_form_generated_region_and_context():
    # B=2, C=1, L=4; the error is 1 everywhere except frame values below.
    output = jnp.asarray([[[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, 0.0, 0.0]]])
    target = jnp.asarray([[[0.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    keep = jnp.asarray([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    valid = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    # generated frames: sample 0 frames 2, 3 (errors 9, 16); sample 1 frames 0-2 (errors 1, 1, 1): (25 + 3) / 5
    loss, metrics = inpainting_loss(SquaredError, output, target, keep, valid, 0.0)
    assert float(loss) == pytest.approx(28.0 / 5.0)
    assert float(metrics["inpaint_generated_fraction"]) == pytest.approx(5.0 / 7.0)
    # context: only sample 0 has any (frames 0, 1: errors 1, 4, mean 2.5); weight 2 -> + 5.0
    loss, metrics = inpainting_loss(SquaredError, output, target, keep, valid, 2.0)
    assert float(metrics["inpaint_context_loss"]) == pytest.approx(2.5)
    assert float(loss) == pytest.approx(28.0 / 5.0 + 5.0)
    # no padding mask: every frame counts; sample 1's frame 3 joins the generated region
    loss, _ = inpainting_loss(SquaredError, output, target, keep, None, 0.0)
    assert float(loss) == pytest.approx(29.0 / 6.0)


def randomized_params(trainer, key):
    """Initial parameters with the zero-initialised outputs redrawn, so the local branch acts on the output."""
    params = trainer.init_params(key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree.unflatten(treedef, [x if x.any() else 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def test_full_masks_give_the_plain_loss_on_the_same_key():
    """probability full = 1: the local input is all zeros (= no input) and the generated region is every frame, so
    the loss is the plain text-to-audio loss drawn from the same key."""
    config = tiny_config("model.local_cond_dim=65", "inpainting.mask_probabilities.full=1.0",
                         "inpainting.mask_probabilities.causal=0.0", "inpainting.mask_probabilities.spans=0.0",
                         "inpainting.mask_probabilities.segments=0.0")
    trainer = DiffusionTrainer(config)
    batch = {k: jnp.asarray(v) for k, v in batch_of(config).items()}
    key = jax.random.key(3)
    with unsharded():
        params = randomized_params(trainer, jax.random.key(0))
        loss, aux = jax.jit(lambda p: trainer.loss(p, batch, key, 0.0))(params)

        @jax.jit
        def plain(params):  # the trainer's loss without the inpainting input, written out
            model, conditioner = trainer.models(params)
            t_key, noise_key, drop_key = jax.random.split(key, 3)
            cond = conditioner.condition(conditioning_inputs(batch), key=drop_key, cfg_dropout_prob=0.0)
            x0 = batch["latents"]
            t = sample_timesteps(t_key, x0.shape[0], config.objective)
            noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
            objective = make_objective(config.objective)
            out = model(objective.add_noise(x0, noise, t), objective.model_time(t), cond)
            return jnp.mean((out - objective.target(x0, noise, t)) ** 2)

        expected = plain(params)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(aux["inpaint_full"]) == 1.0 and float(aux["inpaint_generated_fraction"]) == 1.0
    local_params = nnx.to_flat_state(params["model"])
    assert any("to_local_embed" in "/".join(map(str, path)) for path, _ in local_params)


def test_a_training_step_with_the_input_updates_the_local_branch():
    config = tiny_config("model.local_cond_dim=65", "objective.mask_padding=True",
                         "inpainting.context_loss_weight=1.0")
    trainer, state, step = diffusion_step_on_one_device(config)

    batch = batch_of(config, batch_size=8, valid_lengths=[32, 20, 32, 9, 32, 32, 25, 32])
    new_state, metrics = step(state, batch)
    assert float(metrics["update_skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert 0.0 < float(metrics["inpaint_generated_fraction"]) <= 1.0
    assert sum(float(metrics[f"inpaint_{name}"]) for name in ("full", "causal", "spans", "segments")) == 1.0
    before = state["params"]["model"]["transformer"]["layers"][0]["to_local_embed"]["out_proj"]["kernel"]
    after = new_state["params"]["model"]["transformer"]["layers"][0]["to_local_embed"]["out_proj"]["kernel"]
    assert not np.asarray(before[...]).any() and np.asarray(after[...]).any()  # the zero-init branch learns


def test_sharded_step_with_the_input_equals_single_device(devices):
    """to_local_embed carries logical axis names, so FSDP shards it like the rest; the result does not change."""
    from musicdiff.parallel.sharding import shard_batch

    def two_steps(mesh_shape, devices):
        config = tiny_config(*[f"mesh.{k}={v}" for k, v in mesh_shape.items()], "model.local_cond_dim=65",
                             "inpainting.context_loss_weight=1.0", "inpainting.mask_probabilities.spans=0.5")
        mesh, rules = mesh_and_rules(config, devices)
        trainer = DiffusionTrainer(config)
        batch = batch_of(config, batch_size=8, valid_lengths=[32, 20, 32, 9, 32, 32, 25, 32])
        with sharding_context(mesh, rules):
            state, shardings = loop.init_state(trainer.init_state, mesh, rules, jax.random.key(0))
            step = loop.compile_step(trainer.train_step, shardings, loop.batch_shardings(batch, mesh, rules), mesh,
                                     rules)
            losses = []
            for _ in range(2):
                state, metrics = step(state, shard_batch(batch, mesh, rules))
                losses.append(float(metrics["loss"]))
        kernel = shardings["params"]["model"]["transformer"]["layers"][0]["to_local_embed"]["in_proj"]["kernel"]
        return losses, kernel

    single, _ = two_steps(dict(data=1, fsdp=1, tensor=1, sequence=1), devices[:1])
    sharded, kernel = two_steps(dict(data=2, fsdp=4, tensor=1, sequence=1), devices)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert kernel.get_value().spec == jax.sharding.PartitionSpec(None, "fsdp")

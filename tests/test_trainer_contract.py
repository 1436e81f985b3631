"""The trainer seam: a new trainer is one registered class and a config (here a frozen tiny DiT with trainable per-block
adapters), trained by the shared runner with checkpoints and resume; the runner's NaN guard counts skipped updates."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from musicdiff.checkpoints import find_checkpoint, flatten_with_names, load_model, stored_names
from musicdiff.config import load_config
from musicdiff.metrics import NonFiniteLossError
from musicdiff.training.diffusion import DiffusionTrainer, conditioning_inputs
from musicdiff.training.runner import train
from musicdiff.training.trainer import register_trainer

# ---- the toy trainer: everything it takes to add one (under 60 lines) ------------------------------------------


@register_trainer("toy_adapter")
class ToyAdapterTrainer(DiffusionTrainer):
    """Per-block cross-attention adapters trained on a frozen denoiser and conditioner; the adapters attend to the
    conditioner's cross tokens (the trainer decides what its adapters see)."""

    trainable_patterns = ("model/transformer/adapters/*",)

    def loss(self, params, batch, key, cfg_dropout_prob):
        model, conditioner = self.models(params)
        t_key, noise_key = jax.random.split(key)
        cond = conditioner.condition(conditioning_inputs(batch))
        x0 = batch["latents"]
        t = jax.random.uniform(t_key, (x0.shape[0],))
        noise = jax.random.normal(noise_key, x0.shape)
        output = model(self.objective.add_noise(x0, noise, t), self.objective.model_time(t), cond,
                       adapter_inputs={"tokens": cond.cross_tokens, "mask": cond.cross_mask})
        return self.objective.loss(output, self.objective.target(x0, noise, t)), {}


# ---- tests -------------------------------------------------------------------------------------------------------

ADAPTER = ["trainer=toy_adapter", "batch_size=8", "training.log_every=1", "training.checkpoint_every=2",
           "training.cfg_dropout_prob=0.0"]


def toy_config(latents, steps, *extra):
    config = load_config("configs/diffusion.py:tiny", [f"data.latents={latents}", f"training.num_steps={steps}",
                                                        *ADAPTER, *extra])
    with config.unlocked():
        config.model.adapter = dict(name="cross_attention", width=int(config.conditioner.conditioning.cond_dim))
    return config


def params_at(workdir, step=None):
    ref = find_checkpoint(workdir, step)
    return {f"{section}/{name}": np.asarray(value) for section in ("model", "conditioner")
            for name, value in flatten_with_names(nnx.state(load_model(ref, section, prefer_ema=False),
                                                            nnx.Param))[0].items()}


def test_toy_adapter_trainer_trains_only_its_adapters_and_resumes_exactly(tiny_latents, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(toy_config(tiny_latents, 4), straight)
    assert result.step == 4 and not result.preempted
    before, after = params_at(straight, 2), params_at(straight, 4)
    adapters = [name for name in after if "/adapters/" in name]
    assert adapters and all(name.startswith("model/transformer/adapters/") for name in adapters)
    assert any(not np.array_equal(before[n], after[n]) for n in adapters)  # the adapters train
    for name in after:
        if "/adapters/" not in name:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)  # the base stays frozen
    # Frozen parameters hold no optimiser state: the moments cover the adapters alone.
    moments = [n for n in stored_names(find_checkpoint(straight).step_dir)
               if n.startswith("opt_state/") and re.search(r"/(mu|nu)/", n)]
    assert moments and all("/adapters/" in n for n in moments)
    # Resume: 2 steps, then the same command to 4, equals 4 straight steps bit for bit.
    assert train(toy_config(tiny_latents, 2), resumed).step == 2
    assert train(toy_config(tiny_latents, 4), resumed).step == 4
    for name, value in params_at(resumed, 4).items():
        np.testing.assert_array_equal(value, after[name], err_msg=name)


@register_trainer("nonfinite_gradients")
class NonFiniteGradientTrainer(DiffusionTrainer):
    """From step 3 on, the loss stays finite but its gradients are NaN (d sqrt(u)/du at u = 0 is infinite)."""

    def loss(self, params, batch, key, cfg_dropout_prob):
        loss, aux = super().loss(params, batch, key, cfg_dropout_prob)
        leaf = jax.tree.leaves(params["model"])[0]
        poison = jax.lax.cond(batch["poison"][0] > 0, lambda: jnp.sqrt(jnp.sum(leaf - leaf)), lambda: jnp.float32(0))
        return loss + poison, aux

    def device_batch(self, host_batch):
        # The host's count of batches handed over: 1 is the runner's layout probe, then steps 1, 2, ...
        self.batches = getattr(self, "batches", 0) + 1
        return {**super().device_batch(host_batch), "poison": np.full(8, self.batches > 3, np.int32)}


def test_skipped_updates_with_a_finite_loss_halt_the_run_keeping_good_weights(tiny_latents, tmp_path):
    config = load_config("configs/diffusion.py:tiny", [f"data.latents={tiny_latents}", "trainer=nonfinite_gradients",
                                                       "training.num_steps=20", "training.checkpoint_every=1",
                                                       "training.keep_checkpoints=30", "training.log_every=1",
                                                       "training.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteLossError, match=r"step 5: update skipped for 3 consecutive steps \(non-finite "
                                                 r"gradients \(finite loss\); since step 2"):
        train(config, tmp_path)
    good = params_at(tmp_path, 2)
    for step in (3, 4, 5):  # the skipped steps' checkpoints keep step 2's weights
        for name, value in params_at(tmp_path, step).items():
            np.testing.assert_array_equal(value, good[name], err_msg=f"{step} {name}")

"""Adversarial training of the Oobleck autoencoder (stable_audio_tools_spec.md §1.9) on the shared training core.

Train state (a dict pytree, checkpointed as is):
- `params/autoencoder`, `params/discriminator`: nnx.State of each model's Params;
- `ema/autoencoder`: the EMA of the autoencoder's params (what inference loads);
- `opt_state/generator`, `opt_state/discriminator`: the two optax states (AdamW with InverseLR each);
- `step`: int32 count of steps done, i.e. the reference's `global_step` of the next step;
- `rng`: the base key; step s draws its VAE noise from fold_in(rng, s), so a resumed run draws the same noise.

Alternation, as the reference: a step is a discriminator step when its global step is odd and
(`warmup_mode == "adv"` or the adversarial warm-up is over); every other step is a generator step, with the
adversarial terms from `warmup_steps` on. So there are three kinds of step (`step_kind`), each a straight-line pure
function of (state, batch) (`step(kind)`):
- generator warm-up step: encode (VAE sample) + decode with gradients, loss = mrstft·spectral + mel·mel-scaled
  MR-STFT + l1·L1 + kl·KL (or quantizer·VQ loss, or softnorm·SAME's SoftNorm regulariser), no discriminator pass
  at all; AdamW update of the autoencoder, then EMA;
- generator step: the same + adversarial·G_hinge + feature_matching·FM from a pass of the (fixed) discriminator over
  [reals; fakes];
- discriminator step: the same reconstruction without gradients, hinge loss of the discriminator on
  [reals; stop_gradient(fakes)], AdamW update of the discriminator.
Running statistics (`same_layers.RunningStatistic` params, SAME's SoftNorm running_std) are set by the training pass
itself, on every kind of step as the reference's training-mode forward does; the optimiser's update of them is
replaced by that value.
The runner compiles one program per kind (training/loop.StepPrograms) and picks the kind of each step on the host
(`step_kind`), so the loop stays plain. Only the kinds that steps 0 .. num_steps-1 reach are compiled
(`reachable_kinds`): the SAO recipe compiles two programs, a run that ends inside its warm-up one.
All kinds report the same metrics, all evaluated at the step's incoming parameters (the generator objective is
computed forward-only on discriminator steps), so any logging interval sees comparable numbers.

NaN guard: when the loss or any gradient is non-finite the update is skipped (params, optimiser state and EMA keep
their values; the step counter still advances past the batch), `update_skipped` is 1 and the non-finite loss is in
the metrics, so the runner's NaN guard stops training after `training.max_nonfinite_steps` such steps in a row.

Data and previews (training/autoencoder_data.py): random crops of the audio folder minus its held-out split; every
`demo_every` steps the first held-out clip is reconstructed with the current and the EMA weights.

Counters: the EMA warm-up counts generator steps (as ema_pytorch counts its update calls), in closed form from the
global step (`generator_updates_before`); the logged learning rates are each schedule at its optimiser's own count.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicdiff.audio.stft_losses import STFTLossConfig, autoencoder_spectral_loss, multi_resolution_stft_loss
from musicdiff.errors import ConfigError
from musicdiff.metrics import SKIPPED_METRIC, MetricLogger
from musicdiff.models import registry
from musicdiff.models.discriminator import adversarial_losses
from musicdiff.models.same_layers import RunningStatistic
from musicdiff.parallel.sharding import Rules
from musicdiff.training import autoencoder_data
from musicdiff.training.optim import (all_finite, ema_decay_from, ema_update, learning_rate_schedule, make_optimizer,
                                      select_tree, updates_applied)
from musicdiff.training.trainer import DemoFn, Trainer, register_trainer

log = logging.getLogger(__name__)
WARMUP_MODES = ("adv", "full")
LOSS_WEIGHT_KEYS = ("mrstft", "mel", "l1", "adversarial", "feature_matching", "kl", "quantizer", "softnorm")
_ADVERSARIAL_TERMS = ("discriminator", "adversarial", "feature_matching")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    mrstft: float = 1.0
    mel: float = 0.0
    l1: float = 0.0
    adversarial: float = 0.1
    feature_matching: float = 5.0
    kl: float = 1e-4
    quantizer: float = 1.0
    softnorm: float = 1e-4

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> LossWeights:
        unknown = sorted(set(section) - set(LOSS_WEIGHT_KEYS))
        if unknown:
            raise ConfigError(f"config.training.loss_weights.{unknown[0]}: unknown loss; the losses are "
                              f"{', '.join(LOSS_WEIGHT_KEYS)}")
        return cls(**{k: float(v) for k, v in section.items()})


GENERATOR_WARMUP, GENERATOR, DISCRIMINATOR = 0, 1, 2
STEP_KINDS = ("generator_warmup", "generator", "discriminator")


def generator_updates_before(step: jax.Array | int, warmup_steps: int, warmup_mode: str) -> jax.Array:
    """Generator steps among global steps 0 .. step-1: all warm-up steps in "full" mode, then the even ones."""
    step = jnp.asarray(step, jnp.int32)
    warm = jnp.minimum(step, warmup_steps) if warmup_mode == "full" else jnp.zeros_like(step)
    return warm + (step + 1) // 2 - (warm + 1) // 2


def step_kind(step: int, warmup_steps: int, warmup_mode: str) -> int:
    """GENERATOR_WARMUP, GENERATOR or DISCRIMINATOR for global step `step` (the reference's schedule)."""
    discriminator = step % 2 == 1 and (warmup_mode == "adv" or step >= warmup_steps)
    return DISCRIMINATOR if discriminator else GENERATOR if step >= warmup_steps else GENERATOR_WARMUP


def reachable_kinds(num_steps: int, warmup_steps: int, warmup_mode: str) -> tuple[int, ...]:
    """The step kinds that global steps 0 .. num_steps-1 use (at least one, so a step function always exists)."""
    kinds = {step_kind(s, warmup_steps, warmup_mode) for s in _kind_witnesses(num_steps, warmup_steps)}
    return tuple(sorted(kinds)) or (GENERATOR_WARMUP if warmup_steps else GENERATOR,)


def _kind_witnesses(num_steps: int, warmup_steps: int) -> list[int]:
    # The kind only changes at the warm-up boundary and with parity, so four steps around it decide reachability.
    candidates = {0, 1, warmup_steps, warmup_steps + 1}
    return [s for s in candidates if 0 <= s < num_steps]


def _scalar_metrics(info: Mapping[str, Any]) -> dict[str, jax.Array]:
    return {k: v for k, v in info.items() if k not in ("latents", "codes") and jnp.ndim(v) == 0}


@register_trainer("autoencoder")
class AutoencoderTrainer(Trainer):
    """Adversarial autoencoder training (see the module docstring)."""

    guarded_metrics = ("loss", "discriminator_loss", "grad_norm")
    optional_sections = ("discriminator",)  # init_from a checkpoint without one starts a fresh discriminator

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        training = config.training
        self.weights = LossWeights.from_config(training.loss_weights)
        self.warmup_steps = int(training.warmup_steps)
        self.warmup_mode = str(training.warmup_mode)
        if self.warmup_mode not in WARMUP_MODES:
            raise ConfigError(f"config.training.warmup_mode={self.warmup_mode!r}: choose one of "
                              f"{', '.join(WARMUP_MODES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config.training.warmup_steps={self.warmup_steps}: must be >= 0")
        self.freeze_encoder_after_warmup = bool(training.encoder_freeze_on_warmup)
        self.kinds = reachable_kinds(int(training.num_steps), self.warmup_steps, self.warmup_mode)
        self.bottleneck = str(config.autoencoder.bottleneck.type)
        self.stft = STFTLossConfig(fft_sizes=tuple(int(n) for n in training.stft_fft_sizes),
                                   perceptual_weighting=bool(training.stft_perceptual_weighting),
                                   sample_rate=int(config.autoencoder.sample_rate))
        # The mel-scaled MR-STFT (auraloss scale="mel"), the reconstruction metric's own distance.
        self.mel_stft = STFTLossConfig(fft_sizes=tuple(int(n) for n in training.mel_fft_sizes),
                                       n_mels=int(training.mel_bins),
                                       sample_rate=int(config.autoencoder.sample_rate))
        # The generator's optimiser sees params/autoencoder alone: freezing patterns name "autoencoder/...".
        self.generator_freezing = self.freezing.scoped("autoencoder")
        self.generator_tx = self.generator_freezing.wrap(
            make_optimizer(training.generator, training, "config.training.generator"))
        self.discriminator_tx = make_optimizer(training.discriminator, training, "config.training.discriminator")
        self.generator_lr = learning_rate_schedule({**dict(training), **dict(training.generator)})
        self.discriminator_lr = learning_rate_schedule({**dict(training), **dict(training.discriminator)})
        self.autoencoder_graphdef, _ = nnx.split(nnx.eval_shape(lambda: self._build("autoencoder", 0)), nnx.Param)
        self.discriminator_graphdef, _ = nnx.split(nnx.eval_shape(lambda: self._build("discriminator", 0)),
                                                   nnx.Param)

    def _build(self, section: str, key: Any) -> nnx.Module:
        return registry.build(self.config[section], nnx.Rngs(key))

    # ---- state ------------------------------------------------------------------------------------------------

    def prepare(self, workdir: Path) -> ml_collections.ConfigDict:
        autoencoder_data.check_channels(self.config)
        self.train_items, self.heldout_items = autoencoder_data.split_folder(self.config)
        return self.config

    def dataset(self, mesh, rules):
        return iter(autoencoder_data.process_training_dataset(self.config, self.train_items, mesh, rules))

    def batch_spec(self, mesh, rules) -> dict[str, np.ndarray]:
        data = self.config.data
        return {"audio": np.zeros((int(self.config.batch_size), int(data.channels), int(data.sample_size)),
                                  np.float32)}

    def device_batch(self, host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"audio": np.asarray(host_batch["audio"], np.float32)}  # captions, indices and masks stay on the host

    def init_state(self, key: jax.Array) -> dict[str, Any]:
        """A fresh train state from one key (the runner jit's it straight into its shardings)."""
        autoencoder_key, discriminator_key, rng = jax.random.split(key, 3)
        autoencoder = nnx.state(self._build("autoencoder", autoencoder_key), nnx.Param)
        discriminator = nnx.state(self._build("discriminator", discriminator_key), nnx.Param)
        self.generator_freezing.check(autoencoder)
        return dict(
            params=dict(autoencoder=autoencoder, discriminator=discriminator),
            ema=dict(autoencoder=jax.tree.map(jnp.copy, autoencoder)),
            opt_state=dict(generator=self.generator_tx.init(autoencoder),
                           discriminator=self.discriminator_tx.init(discriminator)),
            step=jnp.zeros((), jnp.int32),
            rng=rng,
        )

    def throughput(self, batch_spec: Mapping[str, np.ndarray]) -> dict[str, float]:
        data = self.config.data
        return {"audio_seconds_per_sec": float(self.config.batch_size) * int(data.sample_size) / int(data.sample_rate)}

    def demo(self, workdir: Path, logger: MetricLogger, mesh, rules: Rules) -> DemoFn | None:
        if not self.heldout_items:
            log.warning("no held-out clip (config.data.heldout_fraction=%s): demos are off",
                        self.config.data.heldout_fraction)
            return None
        return autoencoder_data.ReconstructionDemo(self.autoencoder_graphdef, self.config, self.heldout_items[0],
                                                   workdir, logger, mesh)

    # ---- losses -----------------------------------------------------------------------------------------------

    def _reconstruct(self, autoencoder_params: Any, audio: jax.Array,
                     key: jax.Array) -> tuple[jax.Array, dict, nnx.State]:
        """(decoded [B, C, T], bottleneck info, running statistics) of the training pass (the VAE samples). The
        statistics are the RunningStatistic params as the pass left them (SAME's SoftNorm running_std)."""
        autoencoder = nnx.merge(self.autoencoder_graphdef, autoencoder_params)
        decoded, info = autoencoder(audio, key)
        return decoded[..., : audio.shape[-1]], info, nnx.state(autoencoder, RunningStatistic)

    def _adversarial(self, discriminator_params: Any, audio: jax.Array, decoded: jax.Array) -> dict[str, jax.Array]:
        discriminator = nnx.merge(self.discriminator_graphdef, discriminator_params)
        return adversarial_losses(discriminator, audio, decoded)

    def _generator_objective(self, audio: jax.Array, decoded: jax.Array, info: Mapping[str, Any],
                             adversarial: Mapping[str, jax.Array],
                             adversarial_on: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        w = self.weights
        spectral = autoencoder_spectral_loss(audio, decoded, self.stft)
        metrics = {**_scalar_metrics(info), **spectral}
        loss = w.mrstft * spectral["spectral"]
        if w.mel:
            metrics["mel"] = multi_resolution_stft_loss(decoded, audio, self.mel_stft)  # reals in the denominator
            loss = loss + w.mel * metrics["mel"]
        if w.l1:
            metrics["l1"] = jnp.mean(jnp.abs(decoded - audio))
            loss = loss + w.l1 * metrics["l1"]
        if self.bottleneck == "vae" and w.kl:
            loss = loss + w.kl * info["kl"]
        if self.bottleneck in ("vq", "rvq") and w.quantizer:
            loss = loss + w.quantizer * info["quantizer_loss"]
        if self.bottleneck == "softnorm" and w.softnorm:
            loss = loss + w.softnorm * info["softnorm_loss"]
        gan = w.adversarial * adversarial["adversarial"] + w.feature_matching * adversarial["feature_matching"]
        loss = loss + jnp.where(adversarial_on, gan, 0.0)
        metrics.update(adversarial=adversarial["adversarial"], feature_matching=adversarial["feature_matching"],
                       discriminator_loss=adversarial["discriminator"], loss=loss)
        return loss, metrics

    # ---- the step ---------------------------------------------------------------------------------------------

    def _generator_step(self, state: dict[str, Any], audio: jax.Array, key: jax.Array,
                        adversarial: bool) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        params, opt_state = state["params"], state["opt_state"]

        def loss_fn(autoencoder_params):
            decoded, info, statistics = self._reconstruct(autoencoder_params, audio, key)
            if adversarial:
                terms = self._adversarial(params["discriminator"], audio, decoded)
            else:
                terms = {name: jnp.zeros((), jnp.float32) for name in _ADVERSARIAL_TERMS}
            loss, metrics = self._generator_objective(audio, decoded, info, terms, adversarial)
            return loss, (metrics, statistics)

        (loss, (metrics, statistics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["autoencoder"])
        grads = self.generator_freezing.zero_frozen(grads)
        updates, new_opt = self.generator_tx.update(grads, opt_state["generator"], params["autoencoder"])
        if adversarial and self.freeze_encoder_after_warmup:
            updates = jax.tree_util.tree_map_with_path(
                lambda path, u: jnp.zeros_like(u) if getattr(path[0], "key", None) == "encoder" else u, updates)
        # Running statistics take the training pass's value, not the optimiser's (their gradient is zero).
        new_params = nnx.merge_state(optax.apply_updates(params["autoencoder"], updates), statistics)
        finite = all_finite(loss, grads)
        count = generator_updates_before(state["step"], self.warmup_steps, self.warmup_mode) + 1
        decay = ema_decay_from(self.config.training, count)
        new_ema = ema_update(state["ema"]["autoencoder"], new_params, decay, self.generator_freezing)
        new_state = {
            **state,
            "params": {**params, "autoencoder": select_tree(finite, new_params, params["autoencoder"])},
            "ema": {**state["ema"], "autoencoder": select_tree(finite, new_ema, state["ema"]["autoencoder"])},
            "opt_state": {**opt_state, "generator": select_tree(finite, new_opt, opt_state["generator"])},
        }
        metrics.update(grad_norm=optax.tree.norm(grads), **{SKIPPED_METRIC: 1.0 - finite.astype(jnp.float32)},
                       ema_decay=decay)
        return new_state, metrics

    def _discriminator_step(self, state: dict[str, Any], audio: jax.Array,
                            key: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        params, opt_state = state["params"], state["opt_state"]
        decoded, info, statistics = jax.lax.stop_gradient(self._reconstruct(params["autoencoder"], audio, key))

        def loss_fn(discriminator_params):
            terms = self._adversarial(discriminator_params, audio, decoded)
            return terms["discriminator"], terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["discriminator"])
        updates, new_opt = self.discriminator_tx.update(grads, opt_state["discriminator"], params["discriminator"])
        new_params = optax.apply_updates(params["discriminator"], updates)
        finite = all_finite(loss, grads)
        # Reported only (the generator is not updated here), weighted as the next generator step will weigh it.
        _, metrics = self._generator_objective(audio, decoded, info, terms, state["step"] >= self.warmup_steps)
        new_state = {
            **state,
            # The autoencoder ran its training pass here too, so its running statistics move, as the reference's
            # (which encodes in training mode on every step); its other parameters stay.
            "params": {**params, "discriminator": select_tree(finite, new_params, params["discriminator"]),
                       "autoencoder": select_tree(finite, nnx.merge_state(params["autoencoder"], statistics),
                                                  params["autoencoder"])},
            "opt_state": {**opt_state, "discriminator": select_tree(finite, new_opt, opt_state["discriminator"])},
        }
        metrics.update(grad_norm=optax.tree.norm(grads), **{SKIPPED_METRIC: 1.0 - finite.astype(jnp.float32)},
                       ema_decay=jnp.zeros((), jnp.float32))
        return new_state, metrics

    def _branch(self, kind: int):
        if kind == DISCRIMINATOR:
            return self._discriminator_step
        return functools.partial(self._generator_step, adversarial=kind == GENERATOR)

    def _finish(self, state: dict[str, Any], new_state: dict[str, Any], metrics: dict[str, jax.Array],
                kind: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        step = state["step"]
        metrics.update(
            discriminator_step=(kind == DISCRIMINATOR).astype(jnp.float32),
            adversarial_on=(step >= self.warmup_steps).astype(jnp.float32),
            generator_lr=self.generator_lr(updates_applied(state["opt_state"]["generator"])),
            discriminator_lr=self.discriminator_lr(updates_applied(state["opt_state"]["discriminator"])),
        )
        new_state = {**new_state, "step": step + 1}
        return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

    def step_kinds(self) -> tuple[int, ...]:
        return self.kinds

    def step_kind(self, step: int) -> int:
        return step_kind(step, self.warmup_steps, self.warmup_mode)

    def step(self, kind: Hashable):
        """The pure step for global steps of one kind (`step_kind`): what the runner compiles per kind."""

        def step(state: dict[str, Any], batch: Mapping[str, jax.Array]) -> tuple[dict[str, Any], dict]:
            audio = batch["audio"].astype(jnp.float32)
            key = jax.random.fold_in(state["rng"], state["step"])
            new_state, metrics = self._branch(kind)(state, audio, key)
            return self._finish(state, new_state, metrics, jnp.asarray(kind, jnp.int32))

        return step


__all__ = ["DISCRIMINATOR", "GENERATOR", "GENERATOR_WARMUP", "STEP_KINDS", "AutoencoderTrainer", "LossWeights",
           "generator_updates_before", "reachable_kinds", "step_kind"]

"""Diffusion training on precomputed latents: the "diffusion" trainer (training/trainer.py) and its pure step.

State (a dict pytree, sharded by the logical names its nnx Variables carry):
    params/{model, conditioner}   the denoiser (config.model, any registered denoiser) and the MultiConditioner
                                  (timing embedders, text projection, and the embedded prompt encoder when the
                                  config uses one)
    ema/{model, conditioner}      ema_pytorch-style EMA (spec §3.4); generation uses it
    opt_state                     AdamW + InverseLR (+ optional global-norm clipping); frozen parameters
                                  (training.trainable / frozen) have none
    step                          int32, the number of steps taken (skipped non-finite steps count too)
    rng                           the run's base key; step n draws from fold_in(rng, n), so resume is exact

One step: condition (with per-sample CFG dropout of the cross-attention tokens), draw t and ε, noise the latents,
regress the objective's target (ε, v or the rectified-flow velocity) with the denoiser fed the objective's model time,
AdamW update. With the inpainting input (config.model.local_cond_dim > 0 and an `inpainting` section;
training/inpainting.py) a per-sample mask gives the denoiser `local_cond` and the loss covers the generated region.
A step whose loss or gradients are not finite leaves params, EMA and optimiser untouched
(`update_skipped` = 1) and the runner's NaN guard stops the run after `training.max_nonfinite_steps` in a row.

Variable length (spec §4): with `config.objective.mask_padding` the loss is each sample's mean over its valid frames
(objectives.masked_mse) and a denoiser declaring PADDING_MASK also gets the batch's `padding_mask`, so clips of
different lengths share a batch without the padding reaching the real frames. `config.objective.time_shift` (name
"none" by default) warps the drawn t by a length-aware shift (diffusion/time_shift.py) at each sample's valid length.

Batches come from data_pipelines.latent_source (keys: latents [B, C, L], padding_mask [B, L], seconds_start [B],
seconds_total [B], bpm and beat_offset [B], tonic and mode [B] (the frame conditioners' inputs), and
prompt_embeddings/prompt_mask (frozen T5) or prompt_input_ids/prompt_attention_mask (embedded encoder)).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicdiff.diffusion.objectives import make_objective
from musicdiff.diffusion.time_shift import TimeShift
from musicdiff.diffusion.timesteps import sample_timesteps
from musicdiff.errors import ConfigError
from musicdiff.files import atomic_directory, atomic_write_bytes
from musicdiff.metrics import SKIPPED_METRIC, MetricLogger
from musicdiff.models import registry
from musicdiff.models.conditioning import FRAME_CONDITIONERS, MultiConditioner
from musicdiff.models.denoiser import PADDING_MASK, Denoiser, capabilities, train_flops
from musicdiff.models.text_encoder import prompt_from_batch, text_encoder_kind
from musicdiff.parallel.distributed import on_main_process
from musicdiff.parallel.sharding import Rules, process_batch_rows
from musicdiff.training.inpainting import (MASK_STREAM, inpainting_loss, inpainting_training, local_condition,
                                           mask_type_fractions)
from musicdiff.training.optim import (all_finite, ema_decay_from, ema_update, learning_rate_schedule, make_optimizer,
                                      select_tree, updates_applied)
from musicdiff.training.trainer import DemoFn, Trainer, register_trainer

log = logging.getLogger(__name__)
SECTIONS = ("model", "conditioner")  # the config sections whose models this trainer trains


def conditioning_inputs(batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """The MultiConditioner's inputs from a latent batch: prompt (cached embeddings or token ids), timing, and the
    clips' tempo and key for frame conditioners with ids "tempo" and "key"."""
    inputs = {"prompt": prompt_from_batch(batch), "seconds_start": batch["seconds_start"],
              "seconds_total": batch["seconds_total"]}
    if "bpm" in batch:
        inputs["tempo"] = {"bpm": batch["bpm"], "beat_offset": batch["beat_offset"]}
    if "tonic" in batch:
        inputs["key"] = {"tonic": batch["tonic"], "mode": batch["mode"]}
    return inputs


# ---------------------------------------------------------------------------------------------------- the stage


def _latents_manifest(config: ml_collections.ConfigDict) -> dict[str, Any]:
    from data_pipelines.latent_source import read_manifest

    if not config.data.latents:
        raise ConfigError("config.data.latents is empty: pass --config.data.latents=DIR, the output of "
                          "launch.precompute_latents")
    return read_manifest(config.data.latents)


def resolve_config(config: ml_collections.ConfigDict, manifest: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Fills what the latents decide (autoencoder checkpoint, prompt tokenizer) and checks the shapes agree."""
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    channels = int(manifest["latent_channels"])
    if channels != config.model.io_channels:
        raise ConfigError(f"config.model.io_channels={config.model.io_channels}: the latents in {config.data.latents} "
                          f"have {channels} channels; use --config.model.io_channels={channels}")
    if not config.autoencoder_checkpoint:
        config.autoencoder_checkpoint = manifest["autoencoder_checkpoint"]
    text = manifest["text_encoder"]
    prompt_entry = next(e for e in config.conditioner.conditioning.configs if e["id"] == "prompt")
    prompt_kind = text_encoder_kind(prompt_entry["type"], "config.conditioner prompt type")
    latents_kind = text_encoder_kind(text.get("name"), f"{config.data.latents} manifest text_encoder.name")
    if prompt_kind is not latents_kind:
        raise ConfigError(f"config.conditioner: the prompt uses the {prompt_kind.name} text encoder, but the latents "
                          f"in {config.data.latents} hold {latents_kind.name!r} text fields; precompute with a "
                          f"{prompt_kind.name} text_encoder or use a {latents_kind.name} prompt conditioner")
    prompt_kind.resolve_training(config.prompt_encoder, text, prompt_entry["config"])
    for entry in config.conditioner.conditioning.configs:
        if entry["type"] in FRAME_CONDITIONERS:  # frame conditioners span the training window
            entry["config"]["frames"] = int(config.data.latent_length)
            entry["config"]["frame_rate"] = float(manifest["latent_rate"])
    conditioner = nnx.eval_shape(lambda: registry.build(config.conditioner, nnx.Rngs(0)))
    if int(config.model.get("input_concat_dim", 0)) != conditioner.input_concat_channels:
        raise ConfigError(f"config.model.input_concat_dim={config.model.get('input_concat_dim', 0)}: the conditioner's "
                          f"input_concat_cond_ids {list(conditioner.input_concat_cond_ids)} give "
                          f"{conditioner.input_concat_channels} channels; set it to that")
    return config


def latent_batches(config: ml_collections.ConfigDict, mesh, rules: Rules, *, num_epochs: int | None = None):
    """This process's rows (sharding.process_batch_rows) of every global batch of `config.batch_size` latents: P
    processes together read exactly the batches one process would."""
    from data_pipelines.latent_source import latent_training_dataset

    rows = process_batch_rows(mesh, rules, int(config.batch_size))
    return latent_training_dataset(config.data.latents, latent_length=int(config.data.latent_length),
                                   batch_size=len(rows), batch_rows=rows, global_batch_size=int(config.batch_size),
                                   seed=int(config.seed), shuffle_seed=int(config.data.get("shuffle_seed", 0)),
                                   num_epochs=num_epochs)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """The run's own copy of the prompt tokenizer and the resolved config.json, written by process 0 (the workdir is
    shared by all processes); the others wait for them."""
    source = config.prompt_encoder.get("tokenizer_path", "")
    copied = workdir / "tokenizer"
    if source:
        config.prompt_encoder.tokenizer_path = str(copied.resolve())

    def write() -> None:
        if source and not copied.exists():
            workdir.mkdir(parents=True, exist_ok=True)
            with atomic_directory(copied) as staging:
                shutil.copytree(source, staging, dirs_exist_ok=True)
        text = json.dumps(config.to_dict(), indent=2, default=str) + "\n"
        atomic_write_bytes(workdir / "config.json", text.encode("utf-8"))

    on_main_process("musicdiff_train_diffusion_workdir", write)
    return config


def _tokens_of(batch: Mapping[str, Any], cond_id: str) -> int:
    if cond_id == "prompt":
        key = "prompt_mask" if "prompt_mask" in batch else "prompt_attention_mask"
        return int(batch[key].shape[1])
    return 1


# ---------------------------------------------------------------------------------------------------- the trainer


def _graphdefs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {name: nnx.graphdef(nnx.eval_shape(lambda n=name: registry.build(config[n], nnx.Rngs(0))))
            for name in SECTIONS}


@register_trainer("diffusion")
class DiffusionTrainer(Trainer):
    """Denoiser + conditioner on precomputed latents (see the module docstring)."""

    ema_sections: tuple[str, ...] | None = None  # the params sections the EMA follows (None: every one)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.graphdefs = _graphdefs(config)
        self.objective = make_objective(config.objective)
        self.time_shift = TimeShift.from_config(config.objective.get("time_shift"), "objective.time_shift")
        self.optimizer = self.freezing.wrap(make_optimizer(config.training))
        self.learning_rate = learning_rate_schedule(config.training)
        self.inpainting = inpainting_training(config)  # None: trained without the inpainting input

    def prepare(self, workdir: Path) -> ml_collections.ConfigDict:
        manifest = _latents_manifest(self.config)
        config = prepare_workdir(resolve_config(self.config, manifest), workdir)
        self.graphdefs = _graphdefs(config)  # the latents can decide model structure (e.g. the prompt's digit ids)
        return config

    # ---- data

    def dataset(self, mesh, rules):
        return iter(latent_batches(self.config, mesh, rules))

    def batch_spec(self, mesh, rules):
        # One batch of a separate one-epoch pass gives the layout without moving the training iterator.
        try:
            return self.device_batch(next(iter(latent_batches(self.config, mesh, rules, num_epochs=1))))
        except StopIteration:
            raise ConfigError(f"config.batch_size={self.config.batch_size}: the latents at {self.config.data.latents} "
                              f"hold fewer windows than one batch (batches drop their remainder); lower "
                              f"--config.batch_size or precompute more audio") from None

    # ---- state

    def init_params(self, key: jax.Array) -> dict[str, Any]:
        keys = dict(zip(SECTIONS, jax.random.split(key, len(SECTIONS))))
        return {name: nnx.state(registry.build(self.config[name], nnx.Rngs(keys[name])), nnx.Param)
                for name in SECTIONS}

    def init_state(self, key: jax.Array) -> dict[str, Any]:
        init_key, run_key = jax.random.split(key)
        params = self.init_params(init_key)
        self.freezing.check(params)
        sections = self.ema_sections if self.ema_sections is not None else tuple(params)
        return dict(params=params, ema={name: jax.tree.map(jnp.copy, params[name]) for name in sections},
                    opt_state=self.optimizer.init(params), step=jnp.zeros((), jnp.int32), rng=run_key)

    def models(self, params: Mapping[str, Any]) -> tuple[Denoiser, MultiConditioner]:
        return (nnx.merge(self.graphdefs["model"], params["model"]),
                nnx.merge(self.graphdefs["conditioner"], params["conditioner"]))

    # ---- the step

    def loss(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array], key: jax.Array,
             cfg_dropout_prob: float) -> tuple[jax.Array, dict[str, jax.Array]]:
        model, conditioner = self.models(params)
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        cond = conditioner.condition(conditioning_inputs(batch), key=drop_key, cfg_dropout_prob=cfg_dropout_prob)
        x0 = batch["latents"].astype(jnp.float32)
        t = sample_timesteps(t_key, x0.shape[0], self.config.objective)
        if self.time_shift.active:
            t = self.time_shift(t, jnp.sum(batch["padding_mask"].astype(jnp.float32), axis=-1))
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        x_t = self.objective.add_noise(x0, noise, t)
        mask = batch["padding_mask"] if self.config.objective.get("mask_padding", False) else None
        extras, aux = {}, {}
        if mask is not None and PADDING_MASK in capabilities(model):
            extras["padding_mask"] = mask.astype(bool)
        if self.inpainting is not None:
            extras["local_cond"], keep, types = local_condition(jax.random.fold_in(key, MASK_STREAM), x0,
                                                                batch.get("padding_mask"), self.inpainting)
        output = model(x_t, self.objective.model_time(t), cond, **extras)
        target = self.objective.target(x0, noise, t)
        if self.inpainting is None:
            loss = self.objective.loss(output, target, mask)
        else:
            loss, aux = inpainting_loss(self.objective, output, target, keep, mask, self.inpainting.context_loss_weight)
            aux.update(mask_type_fractions(types))
        return loss, {"std_data": jnp.std(x0), **aux}

    def train_step(self, state: dict[str, Any], batch: Mapping[str, jax.Array]) -> tuple[dict[str, Any], dict]:
        training = self.config.training
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (loss, aux), grads = grad_fn(state["params"], batch, key, float(training.cfg_dropout_prob))
        grads = self.freezing.zero_frozen(grads)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        # The EMA covers the sections the state keeps one for (an adapter run: the adapter alone).
        ema = ema_update(state["ema"], {name: params[name] for name in state["ema"]}, ema_decay_from(training, step),
                         self.freezing)
        finite = all_finite(loss, grads)
        new_state = dict(params=select_tree(finite, params, state["params"]),
                         ema=select_tree(finite, ema, state["ema"]),
                         opt_state=select_tree(finite, opt_state, state["opt_state"]), step=step, rng=state["rng"])
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   SKIPPED_METRIC: 1.0 - finite.astype(jnp.float32),
                   "learning_rate": self.learning_rate(updates_applied(state["opt_state"])), **aux}
        return new_state, metrics

    def step(self, kind: Hashable):
        return self.train_step

    # ---- hooks

    def throughput(self, batch_spec: Mapping[str, np.ndarray]) -> dict[str, float]:
        config = self.config
        per_step = {"tokens_per_sec": float(config.batch_size * config.data.latent_length)}
        peak = float(config.training.get("peak_flops_per_device", 0.0))
        if peak > 0:
            cond_tokens = sum(_tokens_of(batch_spec, cid) for cid in config.conditioner.cross_attention_cond_ids)
            model = nnx.eval_shape(lambda: registry.build(config.model, nnx.Rngs(0)))
            flops = train_flops(model, int(config.batch_size), int(config.data.latent_length), cond_tokens)
            per_step["mfu"] = flops / (peak * jax.device_count())
        return per_step

    def demo(self, workdir: Path, logger: MetricLogger, mesh, rules) -> DemoFn | None:
        if not self.config.autoencoder_checkpoint:
            return None  # precomputed latents alone cannot be listened to
        from musicdiff.inference.previews import DiffusionPreview

        return DiffusionPreview(self.graphdefs, self.config, workdir, logger, mesh, rules)


__all__ = ["DiffusionTrainer", "conditioning_inputs", "latent_batches", "prepare_workdir", "resolve_config"]

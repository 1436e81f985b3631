"""Diffusion (DiT) training on precomputed latents: state, the pure train step, and the `train_diffusion` stage.

State (a dict pytree, sharded by the logical names its nnx Variables carry):
    params/{model, conditioner}   the DiT and the MultiConditioner (timing embedders, text projection, and the
                                  embedded prompt encoder when the config uses one)
    ema/{model, conditioner}      ema_pytorch-style EMA (spec §3.4); generation uses it
    opt_state                     AdamW + InverseLR (+ optional global-norm clipping)
    step                          int32, the number of updates applied (skipped non-finite steps count too)
    rng                           the run's base key; step n draws from fold_in(rng, n), so resume is exact

One step: condition (with per-sample CFG dropout of the cross-attention tokens), draw t and ε, noise the latents,
regress the objective's target (ε, v or the rectified-flow velocity), AdamW update. A step whose loss or gradients
are not finite leaves params, EMA and optimiser untouched (`skipped` = 1 in its metrics) and MetricLogger's NanGuard
stops the run after `training.max_nonfinite_steps` in a row.

Batches come from data_pipelines.latent_source (keys: latents [B, C, L], padding_mask [B, L], seconds_start [B],
seconds_total [B], and prompt_embeddings/prompt_mask (frozen T5) or prompt_input_ids/prompt_attention_mask
(embedded encoder)).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from musicdiff.parallel import DEFAULT_SHARDING_RULES, mesh_config
from musicdiff.diffusion.objectives import Objective, make_objective
from musicdiff.diffusion.timesteps import sample_timesteps
from musicdiff.errors import ConfigError, DataError
from musicdiff.files import atomic_write_bytes
from musicdiff.models import registry
from musicdiff.models.conditioning import MultiConditioner
from musicdiff.models.dit import dit_train_flops
from musicdiff.parallel import make_mesh, param_shardings
from musicdiff.parallel.distributed import on_main_process
from musicdiff.parallel.sharding import Rules, process_batch_rows, sharding_context
from musicdiff.training import loop
from musicdiff.checkpoints import restore_params_only
from musicdiff.metrics import MetricLogger, NanGuard
from musicdiff.training.optim import (all_finite, ema_decay_from, ema_update, learning_rate_schedule, make_optimizer,
                                     select_tree)

log = logging.getLogger(__name__)
MODEL_SECTIONS = ("model", "conditioner")


def conditioning_inputs(batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """The MultiConditioner's inputs from a latent batch: prompt (cached embeddings or token ids) and timing."""
    if "prompt_embeddings" in batch:
        prompt = {"embeddings": batch["prompt_embeddings"], "mask": batch["prompt_mask"]}
    elif "prompt_input_ids" in batch:
        prompt = {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"]}
    else:
        raise DataError(f"latent batch has no prompt (keys: {sorted(batch)}); precompute it with "
                        f"launch.precompute_latents")
    return {"prompt": prompt, "seconds_start": batch["seconds_start"], "seconds_total": batch["seconds_total"]}


@dataclasses.dataclass(frozen=True)
class DiffusionTask:
    """Everything static about a run: graph definitions, objective, optimiser, config."""

    config: ml_collections.ConfigDict
    graphdefs: dict[str, Any]
    objective: Objective
    optimizer: optax.GradientTransformation
    learning_rate: optax.Schedule

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> DiffusionTask:
        graphdefs = {name: nnx.graphdef(nnx.eval_shape(lambda n=name: registry.build(config[n], nnx.Rngs(0))))
                     for name in MODEL_SECTIONS}
        return cls(config=config, graphdefs=graphdefs, objective=make_objective(config.objective),
                   optimizer=make_optimizer(config.training), learning_rate=learning_rate_schedule(config.training))

    def init_params(self, key: jax.Array) -> dict[str, Any]:
        keys = dict(zip(MODEL_SECTIONS, jax.random.split(key, len(MODEL_SECTIONS))))
        return {name: nnx.state(registry.build(self.config[name], nnx.Rngs(keys[name])), nnx.Param)
                for name in MODEL_SECTIONS}

    def init_state(self, key: jax.Array, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fresh state; `params` (fine-tuning) replaces the random initial weights."""
        init_key, run_key = jax.random.split(key)
        params = self.init_params(init_key) if params is None else params
        return dict(params=params, ema=jax.tree.map(jnp.copy, params), opt_state=self.optimizer.init(params),
                    step=jnp.zeros((), jnp.int32), rng=run_key)

    def models(self, params: Mapping[str, Any]) -> tuple[nnx.Module, MultiConditioner]:
        return (nnx.merge(self.graphdefs["model"], params["model"]),
                nnx.merge(self.graphdefs["conditioner"], params["conditioner"]))

    def loss(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array], key: jax.Array,
             cfg_dropout_prob: float) -> tuple[jax.Array, dict[str, jax.Array]]:
        model, conditioner = self.models(params)
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        cond = conditioner.condition(conditioning_inputs(batch), key=drop_key, cfg_dropout_prob=cfg_dropout_prob)
        x0 = batch["latents"].astype(jnp.float32)
        t = sample_timesteps(t_key, x0.shape[0], self.config.objective)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        x_t = self.objective.add_noise(x0, noise, t)
        output = model(x_t, self.objective.model_time(t), cond.cross_tokens, cond.cross_mask, cond.global_embed)
        mask = batch["padding_mask"] if self.config.objective.get("mask_padding", False) else None
        loss = self.objective.loss(output, self.objective.target(x0, noise, t), mask)
        return loss, {"std_data": jnp.std(x0)}

    def train_step(self, state: dict[str, Any], batch: Mapping[str, jax.Array]) -> tuple[dict[str, Any], dict]:
        training = self.config.training
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (loss, aux), grads = grad_fn(state["params"], batch, key, float(training.cfg_dropout_prob))
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        ema = ema_update(state["ema"], params, ema_decay_from(training, step))
        finite = all_finite(loss, grads)
        new_state = dict(params=select_tree(finite, params, state["params"]),
                         ema=select_tree(finite, ema, state["ema"]),
                         opt_state=select_tree(finite, opt_state, state["opt_state"]), step=step, rng=state["rng"])
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), skipped=1.0 - finite.astype(jnp.float32),
                       learning_rate=self.learning_rate(updates_applied(state["opt_state"])),
                       **aux)
        return new_state, metrics


def updates_applied(opt_state: Any) -> jax.Array:
    """The optimiser's update count (what its schedule is evaluated at); skipped steps do not advance it."""
    return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]


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
    if prompt_entry["type"] == "embedded":
        if text.get("name") != "embedded":
            raise ConfigError(f"config.conditioner: the prompt uses the embedded encoder, but the latents in "
                              f"{config.data.latents} hold {text.get('name')!r} text embeddings; precompute with "
                              f"an embedded text_encoder or use a t5 prompt conditioner")
        config.prompt_encoder.tokenizer_path = str(text["tokenizer_path"])
        vocab = int(text.get("vocab_size", prompt_entry["config"]["vocab_size"]))
        if vocab > int(prompt_entry["config"]["vocab_size"]):
            raise ConfigError(f"config.conditioner prompt vocab_size={prompt_entry['config']['vocab_size']}: the "
                              f"latents' tokenizer has {vocab} tokens")
    elif text.get("name") == "embedded":
        raise ConfigError(f"the latents in {config.data.latents} hold caption token ids for an embedded encoder; set "
                          f"a prompt conditioner of type 'embedded' (configs/diffusion.py:tiny does)")
    return config


def _init_params_from(task: DiffusionTask, path: str, mesh, rules: Rules) -> dict[str, Any]:
    """Weights for fine-tuning: EMA of `path` when it has one, else its params; sharded straight from disk."""
    from musicdiff.checkpoints import find_checkpoint

    ref = find_checkpoint(path)
    abstract = jax.eval_shape(task.init_params, jax.random.key(0))
    shardings = param_shardings(abstract, rules, mesh)
    out = {}
    for name in MODEL_SECTIONS:
        subtree = f"ema/{name}" if ref.has_subtree(f"ema/{name}") else f"params/{name}"
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract[name],
                              shardings[name])
        out[name] = restore_params_only(ref.step_dir, target, subtree=subtree)
    log.info("initialised weights from %s (step %d)", ref.step_dir, ref.step)
    return out


def make_demo_fn(task: DiffusionTask, config: ml_collections.ConfigDict, workdir: Path, logger: MetricLogger,
                 mesh: jax.sharding.Mesh | None = None) -> Callable[[int, Any], None] | None:
    """Every `training.demo_every` steps: generate the demo prompts with the EMA weights, decode them, write WAVs to
    WORKDIR/demos/<step>/ and audio + spectrograms to TensorBoard. None when demos are off or no autoencoder is
    known (precomputed latents alone cannot be listened to)."""
    training = config.training
    if not int(training.get("demo_every", 0)) or not config.autoencoder_checkpoint:
        return None
    from musicdiff.audio.io import write_audio
    from musicdiff.inference.generate import SamplerSettings, make_sampler
    from musicdiff.checkpoints import find_checkpoint, load_model
    from musicdiff.inference.prompts import PromptEncoder
    from musicdiff.models.chunking import chunked_decode

    # Decoding happens on process 0 only, so the autoencoder lives on one of its own devices (restored without a
    # mesh, Orbax would lay it out over every process's devices).
    local = make_mesh(mesh_config(data=1), [jax.local_devices()[0]])
    rules = tuple(tuple(rule) for rule in config.get("sharding_rules", DEFAULT_SHARDING_RULES))
    autoencoder = load_model(find_checkpoint(config.autoencoder_checkpoint), "autoencoder", mesh=local)
    prompts = list(training.get("demo_prompts", ())) or ["music"]
    encode = PromptEncoder(config.prompt_encoder)
    rate, ratio = int(autoencoder.config.sample_rate), int(autoencoder.downsampling_ratio)
    seconds = int(config.data.latent_length) * ratio / rate
    # Host arrays: under several processes jit takes them as replicated inputs (every process passes the same).
    inputs = {"prompt": {k: np.asarray(v) for k, v in encode(prompts).items()},
              "seconds_start": np.zeros(len(prompts), np.float32),
              "seconds_total": np.full(len(prompts), seconds, np.float32)}
    sampler = "ddim" if config.objective.name == "v" else ("pingpong" if config.objective.name == "rf_denoiser"
                                                         else "rf-euler" if config.objective.name != "ddpm_eps"
                                                         else "ddpm")
    settings = SamplerSettings(sampler=sampler, steps=int(training.get("demo_steps", 50)),
                               cfg_scale=float(training.get("demo_cfg_scale", 6.0)), sigma_max=1.0)
    shape = (len(prompts), int(config.model.io_channels), int(config.data.latent_length))
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sample_fn = jax.jit(make_sampler(task.graphdefs, config.objective, settings, shape), out_shardings=replicated)

    def demo(step: int, state: Any) -> None:
        # Every process takes part in sampling (the EMA weights are sharded over all of them); process 0 writes.
        latents = sample_fn(state["ema"], inputs, jax.random.key(int(config.seed)))
        if jax.process_index() != 0:
            return
        with sharding_context(local, rules):  # not the training mesh: this runs on process 0 alone
            audio = np.asarray(chunked_decode(autoencoder, np.asarray(latents)))
        out = workdir / "demos" / str(step)
        for index, (prompt, clip) in enumerate(zip(prompts, audio)):
            peak = float(np.max(np.abs(clip))) or 1.0
            clip = clip / peak  # peak-normalised, as the reference's demos
            write_audio(out / f"{index}.wav", clip, rate)
            logger.write_audio(step, f"demo/{index}", clip, rate)
            logger.write_spectrogram(step, f"demo_spectrogram/{index}", clip, rate)
            logger.write_text(step, f"demo_prompt/{index}", prompt)

    return demo


def latent_batches(config: ml_collections.ConfigDict, mesh, rules: Rules, *, num_epochs: int | None = None):
    """This process's rows (sharding.process_batch_rows) of every global batch of `config.batch_size` latents: P
    processes together read exactly the batches one process would."""
    from data_pipelines.latent_source import latent_training_dataset

    rows = process_batch_rows(mesh, rules, int(config.batch_size))
    return latent_training_dataset(config.data.latents, latent_length=int(config.data.latent_length),
                                   batch_size=len(rows), batch_rows=rows, global_batch_size=int(config.batch_size),
                                   seed=int(config.seed), shuffle_seed=int(config.data.get("shuffle_seed", 0)),
                                   num_epochs=num_epochs)


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """The run's own copy of the prompt tokenizer and the resolved config.json, written by process 0 (the workdir is
    shared by all processes); the others wait for them."""
    source = config.prompt_encoder.get("tokenizer_path", "")
    copied = workdir / "tokenizer"
    if source:
        config.prompt_encoder.tokenizer_path = str(copied.resolve())

    def write() -> None:
        if source and not copied.exists():
            staging = workdir / f".tokenizer.{os.getpid()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            staging.rename(copied)
        text = json.dumps(config.to_dict(), indent=2, default=str) + "\n"
        atomic_write_bytes(workdir / "config.json", text.encode("utf-8"))

    on_main_process("musicdiff_train_diffusion_workdir", write)
    return config


def train_diffusion(config: ml_collections.ConfigDict, workdir: Path, *,
                    on_state: Callable[[int, Any], None] | None = None) -> loop.LoopResult:
    """The `launch.train_diffusion` stage: resumes from WORKDIR/checkpoints when present. Multi-host: every process
    runs it on the same (shared) workdir after jax.distributed is up (launch.common does that)."""
    workdir = Path(workdir)
    manifest = _latents_manifest(config)
    config = _prepare_workdir(resolve_config(config, manifest), workdir)
    schedule = loop.Schedule.from_config(config.training)
    with loop.Preemption(sync_every=schedule.preemption_sync_every) as preemption:
        return _train(config, workdir, schedule, preemption, on_state)


def _train(config: ml_collections.ConfigDict, workdir: Path, schedule: loop.Schedule, preemption: loop.Preemption,
           on_state: Callable[[int, Any], None] | None) -> loop.LoopResult:
    mesh, rules = loop.mesh_and_rules(config)
    task = DiffusionTask.from_config(config)
    training = config.training
    data_iter = iter(latent_batches(config, mesh, rules))
    key = jax.random.key(int(config.seed))
    with sharding_context(mesh, rules), loop.open_checkpointer(workdir, schedule) as checkpointer:
        if checkpointer.latest_step() is None and config.get("init_from", ""):
            params = _init_params_from(task, config.init_from, mesh, rules)
            state, shardings = loop.init_state(task.init_state, mesh, rules, key, params)
            start = 0
        else:
            state, shardings, start = loop.restore_or_init(checkpointer, task.init_state, mesh, rules, (key,),
                                                           data_iter=data_iter)
        # One batch of a separate one-epoch pass gives the batch layout without moving the training iterator.
        first = next(iter(latent_batches(config, mesh, rules, num_epochs=1)))
        batch_spec = loop.device_arrays(first)
        step_fn = loop.compile_step(task.train_step, shardings, loop.batch_shardings(batch_spec, mesh, rules), mesh)
        cond_tokens = sum(_tokens_of(first, cid) for cid in config.conditioner.cross_attention_cond_ids)
        flops = dit_train_flops(config.model, int(config.batch_size), int(config.data.latent_length), cond_tokens)
        per_step = {"tokens_per_sec": float(config.batch_size * config.data.latent_length)}
        peak = float(training.get("peak_flops_per_device", 0.0))
        if peak > 0:
            per_step["mfu"] = flops / (peak * jax.device_count())
        guard = NanGuard(int(training.get("max_nonfinite_steps", 5)), keys=("loss",))
        with MetricLogger(workdir, total_steps=schedule.num_steps, initial_step=start, log_every=schedule.log_every,
                          nan_guard=guard, per_step=per_step) as logger:
            _, result = loop.run(state=state, step_fn=step_fn, batches=data_iter, start_step=start,
                                 schedule=schedule, checkpointer=checkpointer, logger=logger, mesh=mesh, rules=rules,
                                 config=config, data_iter=data_iter, on_state=on_state, preemption=preemption,
                                 demo_fn=make_demo_fn(task, config, workdir, logger, mesh),
                                 global_batch_size=int(config.batch_size))
    return result


def _tokens_of(batch: Mapping[str, Any], cond_id: str) -> int:
    if cond_id == "prompt":
        key = "prompt_mask" if "prompt_mask" in batch else "prompt_attention_mask"
        return int(batch[key].shape[1])
    return 1

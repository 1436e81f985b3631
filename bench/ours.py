"""The musicdiff side of `make bench`: one class per row, mirroring bench/reference_side.py.

Each row builds its model and inputs in `__init__`, compiles ahead of time there (`compile_seconds`, reported apart
from the measurement), and `run()` does one measured run and blocks until its results exist. The work per run is
the same as the reference's: same shapes, batch sizes, fp32, and the same algorithmic steps (see each class).
"""

from __future__ import annotations

import shutil
import tempfile
import time
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
from musicdiff.inference.generate import SamplerSettings, make_sampler
from musicdiff.models import registry
from musicdiff.models.denoiser import ConditioningInputs
from musicdiff.models.dit import drop_cross_conditioning
from musicdiff.parallel.sharding import unsharded
from musicdiff.training.optim import make_optimizer


def _compile(fn, *args, donate_argnums=()) -> tuple[Any, float]:
    began = time.perf_counter()
    with unsharded():  # one-device rows: the reference runs on one device too
        compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - began


class AutoencoderEncode:
    """`OobleckAutoencoder.encode` of [B, 2, samples] audio with VAE sampling (the reference always samples)."""

    def __init__(self, section: ml_collections.ConfigDict, batch: int, samples: int):
        model = registry.build(section, nnx.Rngs(0))
        graphdef, self.state = nnx.split(model)
        self.audio = 0.1 * jax.random.normal(jax.random.key(0), (batch, int(section.in_channels), samples))
        self.key = jax.random.key(1)

        def encode(state, audio, key):
            return nnx.merge(graphdef, state).encode(audio, rng=key, sample=True)[0]

        self.encode, self.compile_seconds = _compile(encode, self.state, self.audio, self.key)

    def run(self) -> None:
        jax.block_until_ready(self.encode(self.state, self.audio, self.key))


class AutoencoderDecode:
    """`OobleckAutoencoder.decode` of [B, latent_dim, frames] latents."""

    def __init__(self, section: ml_collections.ConfigDict, batch: int, frames: int):
        model = registry.build(section, nnx.Rngs(0))
        graphdef, self.state = nnx.split(model)
        self.latents = jax.random.normal(jax.random.key(1), (batch, int(section.latent_dim), frames))

        def decode(state, latents):
            return nnx.merge(graphdef, state).decode(latents)

        self.decode, self.compile_seconds = _compile(decode, self.state, self.latents)

    def run(self) -> None:
        jax.block_until_ready(self.decode(self.state, self.latents))


def conditioning_arrays(batch: int, cond_tokens: int, valid_tokens: int, cond_dim: int,
                        global_dim: int) -> dict[str, jax.Array]:
    """Precomputed conditioner outputs (what the diffusion trainer's conditioner hands the DiT): cross tokens with the first
    `valid_tokens` valid, their mask, and the global embedding."""
    mask = jnp.arange(cond_tokens)[None, :] < valid_tokens
    mask = jnp.broadcast_to(mask, (batch, cond_tokens))
    cross = jax.random.normal(jax.random.key(2), (batch, cond_tokens, cond_dim)) * mask[..., None]
    out = {"cross_tokens": cross, "cross_mask": mask}
    if global_dim:
        out["global_embed"] = jax.random.normal(jax.random.key(3), (batch, global_dim))
    return out


class DiTTrainStep:
    """The DiT part of DiffusionTrainer.train_step on precomputed conditioning: draw t and ε, noise the latents, DiT
    forward with 10% CFG dropout of the cross tokens, the objective's MSE, backward, AdamW (the config's optimiser
    with its InverseLR schedule). One jit'ed step with the state donated; `steps_per_run` steps per run."""

    def __init__(self, config: ml_collections.ConfigDict, batch: int, length: int, cond_tokens: int,
                 valid_tokens: int, steps_per_run: int):
        model = registry.build(config.model, nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        optimizer = make_optimizer(config.training)
        objective = make_objective(config.objective)
        objective_config = config.objective
        dropout = float(config.training.cfg_dropout_prob)
        self.steps = steps_per_run
        self.batch = {"latents": jax.random.normal(jax.random.key(4), (batch, int(config.model.io_channels), length)),
                      **conditioning_arrays(batch, cond_tokens, valid_tokens, int(config.model.cond_token_dim),
                                            int(config.model.global_cond_dim))}
        self.state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
                      "rng": jax.random.key(5)}

        def loss_fn(params, batch, key):
            t_key, noise_key, drop_key = jax.random.split(key, 3)
            x0 = batch["latents"]
            t = sample_timesteps(t_key, x0.shape[0], objective_config)
            noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
            tokens, mask = drop_cross_conditioning(drop_key, batch["cross_tokens"], batch["cross_mask"], dropout)
            cond = ConditioningInputs(tokens, mask, batch.get("global_embed"))
            output = nnx.merge(graphdef, params)(objective.add_noise(x0, noise, t), objective.model_time(t), cond)
            return objective.loss(output, objective.target(x0, noise, t))

        def step(state, batch):
            key = jax.random.fold_in(state["rng"], state["step"])
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                    "step": state["step"] + 1, "rng": state["rng"]}, loss

        self.step, self.compile_seconds = _compile(step, self.state, self.batch, donate_argnums=0)

    def run(self) -> None:
        for _ in range(self.steps):
            self.state, loss = self.step(self.state, self.batch)
        jax.block_until_ready(loss)


class Sampling:
    """`make_sampler` (conditioning + the whole sampler loop + CFG as one doubled batch, one jit) on precomputed
    prompt embeddings, as Generator runs it for one clip."""

    def __init__(self, config: ml_collections.ConfigDict, settings: SamplerSettings, batch: int, length: int,
                 prompt_tokens: int, valid_tokens: int, prompt_dim: int = 768):
        model = registry.build(config.model, nnx.Rngs(0))
        conditioner = registry.build(config.conditioner, nnx.Rngs(1))
        graphdefs = {"model": nnx.graphdef(model), "conditioner": nnx.graphdef(conditioner)}
        self.params = {"model": nnx.state(model), "conditioner": nnx.state(conditioner)}
        shape = (batch, int(config.model.io_channels), length)
        sample_fn = make_sampler(graphdefs, config.objective, settings, shape)
        mask = jnp.broadcast_to(jnp.arange(prompt_tokens)[None, :] < valid_tokens, (batch, prompt_tokens))
        embeddings = jax.random.normal(jax.random.key(2), (batch, prompt_tokens, prompt_dim)) * mask[..., None]
        self.inputs = {"prompt": {"embeddings": embeddings, "mask": mask},
                       "seconds_total": jnp.full((batch,), 47.0, jnp.float32)}
        ids = [entry["id"] for entry in config.conditioner.conditioning.configs]
        if "seconds_start" in ids:
            self.inputs["seconds_start"] = jnp.zeros((batch,), jnp.float32)
        self.key = jax.random.key(6)
        self.sample, self.compile_seconds = _compile(sample_fn, self.params, self.inputs, self.key)

    def run(self) -> None:
        jax.block_until_ready(self.sample(self.params, self.inputs, self.key))


class SA3Generation:
    """Stable Audio 3 text-to-audio for one clip as one compiled program: `make_sampler` (conditioning, ping-pong
    steps with cfg 1 under the padding mask of `valid` of `frames` frames, the all-zero inpainting input the DiT adds
    when none is given) on precomputed prompt tokens, then the SAME decode with the audio zeroed past the valid
    frames, as the reference's sample_diffusion does."""

    def __init__(self, config: ml_collections.ConfigDict, autoencoder_section: ml_collections.ConfigDict, frames: int,
                 valid: int, steps: int, prompt_tokens: int, seconds: float, time_shift: dict[str, Any]):
        model = registry.build(config.model, nnx.Rngs(0))
        conditioner = registry.build(config.conditioner, nnx.Rngs(1))
        autoencoder = registry.build(autoencoder_section, nnx.Rngs(2))
        graphdefs = {"model": nnx.graphdef(model), "conditioner": nnx.graphdef(conditioner)}
        decoder_graphdef = nnx.graphdef(autoencoder)
        self.params = {"model": nnx.state(model), "conditioner": nnx.state(conditioner),
                       "autoencoder": nnx.state(autoencoder)}
        # length_bucket_frames > 0 is what turns the padding mask on; the length itself is fixed here.
        settings = SamplerSettings(sampler="pingpong", steps=steps, cfg_scale=1.0, sigma_max=1.0,
                                   length_bucket_frames=frames, time_shift=TimeShift.from_config(time_shift))
        sample_fn = make_sampler(graphdefs, config.objective, settings, (1, int(config.model.io_channels), frames))
        ratio = autoencoder.downsampling_ratio
        width = int(config.conditioner.conditioning.cond_dim)
        self.inputs = {"prompt": {"embeddings": jax.random.normal(jax.random.key(2), (1, prompt_tokens, width)),
                                  "mask": jnp.ones((1, prompt_tokens), bool)},
                       "seconds_total": jnp.full((1,), seconds, jnp.float32)}
        self.valid = jnp.full((1,), valid, jnp.int32)
        self.key = jax.random.key(6)

        def generate(params, inputs, key, valid):
            latents = sample_fn(params, inputs, key, valid_frames=valid)
            # bf16 DiTs (the accelerator row) hand the fp32 decoder fp32 latents, as Generator does.
            audio = nnx.merge(decoder_graphdef, params["autoencoder"]).decode(latents.astype(jnp.float32))
            audible = jnp.arange(audio.shape[-1])[None, None, :] < valid[:, None, None] * ratio
            return jnp.where(audible, audio, 0.0)

        self.generate, self.compile_seconds = _compile(generate, self.params, self.inputs, self.key, self.valid)

    def run(self) -> None:
        jax.block_until_ready(self.generate(self.params, self.inputs, self.key, self.valid))


class Precompute:
    """The whole `precompute_latents` stage (scan, Grain windows, batched jit'ed encoder, text fields, ArrayRecord
    shards, manifest) into a fresh workdir per run; the encoder program is compiled once per process."""

    def __init__(self, config: ml_collections.ConfigDict):
        from musicdiff.inference.precompute import precompute_latents

        self.config = config
        self.precompute = precompute_latents
        self.root = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
        self.runs = 0
        began = time.perf_counter()
        self.windows = self.run()  # the first run compiles the encoder program, which later runs reuse
        self.compile_seconds = time.perf_counter() - began

    def run(self) -> int:
        workdir = self.root / str(self.runs)
        self.runs += 1
        summary = self.precompute(self.config, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        return int(summary["windows_encoded"])

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class AudioPipeline:
    """data_pipelines.grain_pipeline.training_dataset over an audio folder (decode of the crop only, soxr resample,
    random crop, batch): `measure_clips` clips per run from one long-lived iterator."""

    def __init__(self, source, data_config: ml_collections.ConfigDict, measure_clips: int):
        from data_pipelines.grain_pipeline import training_dataset

        self.batch_size = int(data_config.batch_size)
        self.batches = max(1, measure_clips // self.batch_size)
        self.iterator = iter(training_dataset(source, data_config, seed=0, process_index=0, process_count=1))
        began = time.perf_counter()
        for _ in range(2):  # worker start-up and first reads
            next(self.iterator)
        self.compile_seconds = time.perf_counter() - began

    def run(self) -> None:
        for _ in range(self.batches):
            batch = next(self.iterator)
        assert np.asarray(batch["audio"]).shape[0] == self.batch_size

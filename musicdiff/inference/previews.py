"""Previews during training: generation with the current EMA weights, handed to the training loop as its demo hook.

`DiffusionPreview(step, state)`, every `training.demo_every` steps of a diffusion run: generate
`training.demo_prompts` (`demo_steps` steps of the objective's default sampler at CFG `demo_cfg_scale`), decode
them, write peak-normalised WAVs to WORKDIR/demos/<step>/ and audio, spectrograms and prompts to TensorBoard.
Every process takes part in sampling (the EMA weights are sharded over all of them); process 0 decodes and writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from musicdiff.audio.io import write_audio
from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.diffusion.objectives import make_objective
from musicdiff.diffusion.samplers import sampler_spec
from musicdiff.inference.generate import SamplerSettings, conditioning_inputs, make_sampler
from musicdiff.inference.prompts import PromptEncoder
from musicdiff.metrics import MetricLogger
from musicdiff.models.chunking import chunked_decode
from musicdiff.parallel import make_mesh, mesh_config
from musicdiff.parallel.sharding import Rules, sharding_context


class DiffusionPreview:
    def __init__(self, graphdefs: Mapping[str, Any], config: ml_collections.ConfigDict, workdir: Path,
                 logger: MetricLogger, mesh: jax.sharding.Mesh, rules: Rules):
        training = config.training
        self.config, self.logger, self.directory = config, logger, Path(workdir) / "demos"
        self.rules = rules
        # Decoding happens on process 0 only, so the autoencoder lives on one of its own devices (restored without a
        # mesh, Orbax would lay it out over every process's devices).
        self.local = make_mesh(mesh_config(data=1), [jax.local_devices()[0]])
        self.autoencoder = load_model(find_checkpoint(config.autoencoder_checkpoint), "autoencoder", mesh=self.local,
                                      rules=rules)
        self.prompts = list(training.get("demo_prompts", ())) or ["music"]
        self.rate = int(self.autoencoder.config.sample_rate)
        seconds = int(config.data.latent_length) * int(self.autoencoder.downsampling_ratio) / self.rate
        encoded = PromptEncoder(config.prompt_encoder)(self.prompts)
        # Host arrays: under several processes jit takes them as replicated inputs (every process passes the same).
        self.inputs = conditioning_inputs(encoded, self.prompts, [0.0] * len(self.prompts),
                                          [seconds] * len(self.prompts))
        sampler = make_objective(config.objective).default_sampler
        sigma_min, sigma_max = sampler_spec(sampler).sigma_range
        settings = SamplerSettings(sampler=sampler, steps=int(training.get("demo_steps", 50)),
                                   cfg_scale=float(training.get("demo_cfg_scale", 6.0)), sigma_min=sigma_min,
                                   sigma_max=sigma_max)
        shape = (len(self.prompts), int(config.model.io_channels), int(config.data.latent_length))
        sample = make_sampler(graphdefs, config.objective, settings, shape)

        def traced(params, inputs, key):
            with sharding_context(mesh, rules):
                return sample(params, inputs, key)

        self.sample_fn = jax.jit(traced, out_shardings=NamedSharding(mesh, P()))

    def __call__(self, step: int, state: Any) -> None:
        latents = self.sample_fn(state["ema"], self.inputs, jax.random.key(int(self.config.seed)))
        if jax.process_index() != 0:
            return
        with sharding_context(self.local, self.rules):  # not the training mesh: this runs on process 0 alone
            audio = np.asarray(chunked_decode(self.autoencoder, np.asarray(latents)))
        out = self.directory / str(step)
        for index, (prompt, clip) in enumerate(zip(self.prompts, audio)):
            peak = float(np.max(np.abs(clip))) or 1.0
            clip = clip / peak  # peak-normalised, as the reference's demos
            write_audio(out / f"{index}.wav", clip, self.rate)
            self.logger.write_audio(step, f"demo/{index}", clip, self.rate)
            self.logger.write_spectrogram(step, f"demo_spectrogram/{index}", clip, self.rate)
            self.logger.write_text(step, f"demo_prompt/{index}", prompt)


__all__ = ["DiffusionPreview"]

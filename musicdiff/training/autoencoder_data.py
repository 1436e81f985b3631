"""The autoencoder trainer's data and previews (training/autoencoder.py is the trainer).

- Data: the audio-folder scan of `config.data.root`, minus the held-out split (data_pipelines/splits.py, by path
  hash, `data.heldout_fraction`), through the Grain `training_dataset` (shuffled, random crops of `sample_size`).
  Each process reads the rows of every global batch that its devices hold (sharding.process_batch_rows), so P
  processes together train on exactly the batches one process would; the global batch is split over the mesh's data
  and fsdp axes, parameters and optimiser moments over fsdp (config.sharding_rules).
- Previews: every `demo_every` steps the first `demo_seconds` of the first held-out clip are reconstructed with the
  current and the EMA weights: WAVs in WORKDIR/demos/<step>/, audio and log-mel spectrogram images in TensorBoard,
  and its reconstruction scores (musicdiff.audio.metrics) in TensorBoard and WORKDIR/demos/metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines.audio_folder import AudioItem, data_root, scan
from data_pipelines.grain_pipeline import AudioFolderSource, ClipSpec, make_example, training_dataset
from data_pipelines.splits import split_items
from musicdiff.config import downsampling_ratio
from musicdiff.errors import ConfigError, DataError
from musicdiff.parallel.sharding import process_batch_rows
from musicdiff.metrics import MetricLogger

log = logging.getLogger(__name__)


def split_folder(config: ml_collections.ConfigDict) -> tuple[list[AudioItem], list[AudioItem]]:
    """(training items, held-out items) of the configured audio folder; refuses a folder with nothing to train on."""
    result = scan(config)
    fraction = float(config.data.heldout_fraction)
    train, heldout = split_items(result.items, fraction, "train"), split_items(result.items, fraction, "heldout")
    if not train:
        raise DataError(f"{data_root(config)}: no clip left to train on ({result.usable} usable, {len(heldout)} held "
                        f"out by config.data.heldout_fraction={fraction}); add audio or lower the fraction "
                        f"(run launch.inspect_data to see skipped files)")
    return train, heldout


def process_data_config(config: ml_collections.ConfigDict, rows: tuple[int, ...]) -> ml_collections.ConfigDict:
    """`config.data` with this process's `batch_size`: the number of its `rows` of each global batch."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.batch_size = len(rows)
    return data


def process_training_dataset(config: ml_collections.ConfigDict, items: list[AudioItem], mesh, rules):
    """This process's rows (sharding.process_batch_rows) of every global batch of `config.batch_size` crops."""
    rows = process_batch_rows(mesh, rules, int(config.batch_size))
    return training_dataset(AudioFolderSource(items), process_data_config(config, rows), seed=int(config.seed),
                            batch_rows=rows, global_batch_size=int(config.batch_size))


def check_channels(config: ml_collections.ConfigDict) -> None:
    if int(config.data.channels) != int(config.autoencoder.in_channels):
        raise ConfigError(f"config.data.channels={config.data.channels}: the autoencoder takes "
                          f"{config.autoencoder.in_channels} channels; set --config.data.channels="
                          f"{config.autoencoder.in_channels}")


class ReconstructionDemo:
    """The demo of `demo_every`: see the module docstring. Every process reconstructs (the weights are global
    arrays); process 0 writes."""

    def __init__(self, graphdef: Any, config: ml_collections.ConfigDict, item: AudioItem, workdir: Path,
                 logger: MetricLogger, mesh: jax.sharding.Mesh):
        self.logger, self.directory = logger, Path(workdir) / "demos"
        self.rate = int(config.autoencoder.sample_rate)
        ratio = downsampling_ratio(config.autoencoder)
        samples = max(ratio, int(float(config.training.demo_seconds) * self.rate) // ratio * ratio)
        spec = ClipSpec(self.rate, samples, int(config.data.channels), str(config.data.normalize), random_crop=False)
        example = make_example(AudioFolderSource([item])[0], 0, spec)
        self.length = int(example["padding_mask"].sum())
        self.real = example["audio"][:, : self.length]
        self.name = item.relpath
        self._audio = example["audio"][None]

        def reconstruct(params, audio):
            model = nnx.merge(graphdef, params)
            latents, _ = model.encode(audio, sample=False)
            return model.decode(latents)[..., : audio.shape[-1]]

        self._reconstruct = jax.jit(reconstruct, out_shardings=NamedSharding(mesh, P()))
        self._wrote_real = False

    def __call__(self, step: int, state: Any) -> None:
        from musicdiff.audio.io import write_audio
        from musicdiff.audio.metrics import reconstruction_metrics
        from musicdiff.files import atomic_write_bytes

        outputs = {"reconstruction": state["params"]["autoencoder"], "reconstruction_ema": state["ema"]["autoencoder"]}
        audio = {name: np.asarray(self._reconstruct(params, self._audio))[0, :, : self.length]
                 for name, params in outputs.items()}
        if jax.process_index() != 0:
            return
        out = self.directory / str(step)
        out.mkdir(parents=True, exist_ok=True)
        if not self._wrote_real:
            write_audio(self.directory / "real.wav", self.real, self.rate)
            self.logger.write_audio(step, "demo/real", self.real, self.rate)
            self.logger.write_spectrogram(step, "demo_spectrogram/real", self.real, self.rate)
            self._wrote_real = True
        scores = {}
        for name, clip in audio.items():
            write_audio(out / f"{name}.wav", np.clip(clip, -1.0, 1.0), self.rate)  # 16-bit PCM would wrap
            self.logger.write_audio(step, f"demo/{name}", clip, self.rate)
            self.logger.write_spectrogram(step, f"demo_spectrogram/{name}", clip, self.rate)
            if np.all(np.isfinite(clip)):
                metrics = reconstruction_metrics(self.real, clip, self.rate)
                scores.update({f"demo/{name}/{metric}": value for metric, value in metrics.items()})
        self.logger.write_scalars(step, scores, jsonl=False)
        lines = self.directory / "metrics.jsonl"
        previous = lines.read_bytes() if lines.exists() else b""
        record = json.dumps({"step": int(step), "clip": self.name, **scores}) + "\n"
        atomic_write_bytes(lines, previous + record.encode())


__all__ = ["ReconstructionDemo", "check_channels", "process_data_config", "process_training_dataset", "split_folder"]

"""The `launch.train_autoencoder` stage: audio folder -> Grain random crops -> adversarial Oobleck training.

    python -m launch.train_autoencoder --config=configs/autoencoder.py:tiny --config.data.root=ROOT --workdir=DIR

- Data: the audio-folder scan of `config.data.root`, minus the held-out split (data_pipelines/splits.py, by path
  hash, `data.heldout_fraction`), through the Grain `training_dataset` (shuffled, random crops of `sample_size`).
  Each process reads the rows of every global batch that its devices hold (sharding.process_batch_rows), so P
  processes together train on exactly the batches one process would; the global batch is split over the mesh's data
  and fsdp axes, parameters and optimiser moments over fsdp (config.sharding_rules). SIGTERM (preemption) at any
  point after start-up saves a checkpoint at the next step all processes agree on and exits 0.
- Checkpoints: WORKDIR/checkpoints/<step>/{state, data_iter, config} every `checkpoint_every` steps and at the end
  (keep the last `keep_checkpoints`); rerunning the same command resumes from the latest one, data position
  included. `init_from` starts a new run from another checkpoint's weights with fresh optimisers.
- Logging: metrics.jsonl, TensorBoard scalars and a progress bar (musicdiff.metrics). Every `demo_every`
  steps the first `demo_seconds` of the first held-out clip are reconstructed with the current and the EMA weights:
  WAVs in WORKDIR/demos/<step>/, audio and log-mel spectrogram images in TensorBoard, and its reconstruction scores
  (musicdiff.eval.reconstruction) in TensorBoard and WORKDIR/demos/metrics.jsonl.
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
from musicdiff.errors import ConfigError, DataError
from musicdiff.parallel.sharding import process_batch_rows
from musicdiff.training import loop
from musicdiff.training.autoencoder import AlternatingStep, AutoencoderTrainer
from musicdiff.metrics import MetricLogger, NanGuard

log = logging.getLogger(__name__)
GUARDED_METRICS = ("loss", "discriminator_loss", "grad_norm")


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


def _check_channels(config: ml_collections.ConfigDict) -> None:
    if int(config.data.channels) != int(config.autoencoder.in_channels):
        raise ConfigError(f"config.data.channels={config.data.channels}: the autoencoder takes "
                          f"{config.autoencoder.in_channels} channels; set --config.data.channels="
                          f"{config.autoencoder.in_channels}")


def audio_batches(iterator: Iterator[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
    """Only the audio goes to the devices (captions, indices and masks stay on the host)."""
    for batch in iterator:
        yield {"audio": np.asarray(batch["audio"], np.float32)}


class ReconstructionDemo:
    """The demo of `demo_every`: see the module docstring. Every process reconstructs (the weights are global
    arrays); process 0 writes."""

    def __init__(self, trainer: AutoencoderTrainer, config: ml_collections.ConfigDict, item: AudioItem,
                 workdir: Path, logger: MetricLogger, mesh: jax.sharding.Mesh):
        from musicdiff.models.autoencoder import OobleckConfig

        self.logger, self.directory = logger, Path(workdir) / "demos"
        self.rate = int(config.autoencoder.sample_rate)
        ratio = OobleckConfig.from_config(config.autoencoder).downsampling_ratio
        samples = max(ratio, int(float(config.training.demo_seconds) * self.rate) // ratio * ratio)
        spec = ClipSpec(self.rate, samples, int(config.data.channels), str(config.data.normalize), random_crop=False)
        example = make_example(AudioFolderSource([item])[0], 0, spec)
        self.length = int(example["padding_mask"].sum())
        self.real = example["audio"][:, : self.length]
        self.name = item.relpath
        self._audio = example["audio"][None]
        graphdef = trainer.autoencoder_graphdef

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


def train_autoencoder(config: ml_collections.ConfigDict, workdir: Path, *,
                      on_state: Callable[[int, Any], None] | None = None) -> loop.LoopResult:
    """The `launch.train_autoencoder` stage (see the module docstring); resumes from WORKDIR/checkpoints."""
    workdir = Path(workdir)
    _check_channels(config)
    schedule = loop.Schedule.from_config(config.training)
    with loop.Preemption(sync_every=schedule.preemption_sync_every) as preemption:
        return _train(config, workdir, schedule, preemption, on_state)


def _train(config: ml_collections.ConfigDict, workdir: Path, schedule: loop.Schedule, preemption: loop.Preemption,
           on_state: Callable[[int, Any], None] | None) -> loop.LoopResult:
    train_items, heldout_items = split_folder(config)
    log.info("training on %d clips, %d held out", len(train_items), len(heldout_items))
    trainer = AutoencoderTrainer(config)
    mesh, rules = loop.mesh_and_rules(config)
    data_iter = iter(process_training_dataset(config, train_items, mesh, rules))
    key = jax.random.key(int(config.seed))
    with loop.open_checkpointer(workdir, schedule) as checkpointer:
        fresh = checkpointer.latest_step() is None
        state, shardings, start = loop.restore_or_init(checkpointer, trainer.init, mesh, rules, (key,),
                                                       data_iter=data_iter)
        if fresh and config.get("init_from", ""):
            state = trainer.initialize_from(state, shardings, str(config.init_from))
            log.info("initialised the weights from %s", config.init_from)
        audio_spec = np.zeros((int(config.batch_size), int(config.data.channels), int(config.data.sample_size)),
                              np.float32)
        step_fn = AlternatingStep(trainer, shardings, loop.batch_shardings({"audio": audio_spec}, mesh, rules), mesh,
                                  rules, start_step=start)
        seconds_per_step = float(config.batch_size) * int(config.data.sample_size) / int(config.data.sample_rate)
        guard = NanGuard(int(config.training.max_nonfinite_steps), keys=GUARDED_METRICS)
        with MetricLogger(workdir, total_steps=schedule.num_steps, initial_step=start, log_every=schedule.log_every,
                          nan_guard=guard, per_step={"audio_seconds_per_sec": seconds_per_step}) as logger:
            demo = None
            if schedule.demo_every and heldout_items:
                demo = ReconstructionDemo(trainer, config, heldout_items[0], workdir, logger, mesh)
            elif schedule.demo_every:
                log.warning("no held-out clip (config.data.heldout_fraction=%s): demos are off",
                            config.data.heldout_fraction)
            _, result = loop.run(state=state, step_fn=step_fn, batches=audio_batches(data_iter), start_step=start,
                                 schedule=schedule, checkpointer=checkpointer, logger=logger, mesh=mesh, rules=rules,
                                 config=config, data_iter=data_iter, demo_fn=demo, on_state=on_state,
                                 preemption=preemption, global_batch_size=int(config.batch_size))
    return result


__all__ = ["ReconstructionDemo", "audio_batches", "process_data_config", "process_training_dataset", "split_folder",
           "train_autoencoder"]

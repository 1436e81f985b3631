"""Training metrics: TensorBoard, `metrics.jsonl`, a progress bar and a non-finite-loss guard.

Device metrics are read one step late: `push(step, metrics)` is called right after step N is dispatched; it keeps
step N's arrays and converts step N-1's to host floats. Step N-1 has finished or is about to, and step N is already
queued, so the accelerator never idles waiting for the host and nothing calls block_until_ready in the loop.

`metrics.jsonl` gets one JSON object per logged step: {"step": N, "<name>": value, ...}, floats at full precision,
non-finite values written as the strings "NaN", "Infinity", "-Infinity" (strict JSON). Lines are appended and
flushed as written, so after a resume from an earlier checkpoint a step can appear twice: the later line wins.
Only process 0 writes (TensorBoard, jsonl, progress bar); every process fetches and runs the guard, so all of them
stop together.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np


class NonFiniteLossError(FloatingPointError):
    """Training skipped its update (non-finite loss or gradients) for too many consecutive steps."""


SKIPPED_METRIC = "update_skipped"  # 1.0 on a step whose update a trainer skipped (training/trainer.py)


class NanGuard:
    """Counts skipped updates: a step is bad when it reports `update_skipped` > 0 or a watched metric is not finite.
    Raises after `max_consecutive` bad steps in a row (naming the step); a good step resets the count. A skipped
    update leaves the parameters as they were, so the checkpoints written meanwhile keep the last good weights."""

    def __init__(self, max_consecutive: int = 20, keys: Sequence[str] | None = None):
        """`keys`: the metrics that must be finite (default: all of them)."""
        if max_consecutive < 1:
            raise ValueError(f"NanGuard: max_consecutive={max_consecutive} must be at least 1")
        self.max_consecutive = max_consecutive
        self.keys = tuple(keys) if keys is not None else None
        self.consecutive = 0
        self.total = 0
        self.last_good_step: int | None = None

    def check(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Returns whether the step's update was applied; raises NonFiniteLossError on the `max_consecutive`-th
        skipped update in a row."""
        watched = metrics if self.keys is None else {k: metrics[k] for k in self.keys if k in metrics}
        bad = sorted(name for name, value in watched.items() if not math.isfinite(value))
        skipped = metrics.get(SKIPPED_METRIC, 0.0)
        if not bad and not (skipped > 0 or not math.isfinite(skipped)):
            self.consecutive = 0
            self.last_good_step = step
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            since = f"since step {self.last_good_step}" if self.last_good_step is not None else "from the start"
            what = f"non-finite {', '.join(bad)}" if bad else "non-finite gradients (finite loss)"
            raise NonFiniteLossError(
                f"step {step}: update skipped for {self.consecutive} consecutive steps ({what}; {since}; {self.total} "
                f"skipped in all); the checkpoints hold the last good weights. Lower the learning rates "
                f"(autoencoders: ~10x, as in stable-audio-tools #144) or resume from an earlier checkpoint."
            )
        return False


def _to_host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    fetched = jax.device_get(dict(metrics))  # one transfer for the whole dict
    host = {}
    for name, value in fetched.items():
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(f"metric '{name}' has shape {array.shape}; metrics must be scalars")
        host[name] = float(array.reshape(()))
    return host


def _json_value(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class MetricLogger:
    """Writes scalars every `log_every` steps; images, audio and text on demand. See the module docstring."""

    def __init__(self, workdir: str | Path, *, total_steps: int | None = None, initial_step: int = 0,
                 log_every: int = 1, nan_guard: NanGuard | None = None, progress: bool = True,
                 tensorboard: bool = True, progress_key: str = "loss", is_main_process: bool | None = None,
                 per_step: Mapping[str, float] | None = None):
        """`per_step` {name: amount per step} adds `name` = amount x steps/s to each logged record (tokens_per_sec
        from tokens per step; mfu from FLOPs per step / peak FLOP/s), beside `steps_per_sec` and `step_time`."""
        self.workdir = Path(workdir)
        self.log_every = max(1, int(log_every))
        self.nan_guard = nan_guard
        self.per_step = dict(per_step or {})
        self.progress_key = progress_key
        self.is_main = jax.process_index() == 0 if is_main_process is None else is_main_process
        self._pending: tuple[int, Mapping[str, Any]] | None = None
        self._last_written: tuple[int, float] | None = None  # (step, time) of the last scalar record
        self._progress_step = initial_step
        self._jsonl = None
        self._writer = None
        self._bar = None
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(logdir=str(self.workdir / "tensorboard"))
            if progress:
                from tqdm import tqdm

                self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    # ---- scalars ----------------------------------------------------------------------------------------------

    def push(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """Queues `step`'s (device) metrics and processes the previous step's; returns those host values, if any."""
        previous, self._pending = self._pending, (step, metrics)
        return self._process(*previous) if previous is not None else None

    def flush(self) -> dict[str, float] | None:
        """Processes the queued step now (end of training, before an eval or a checkpoint-and-exit)."""
        previous, self._pending = self._pending, None
        result = self._process(*previous) if previous is not None else None
        if self._writer is not None:
            self._writer.flush()
        return result

    def _process(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        host = _to_host_scalars(metrics)
        if self._bar is not None:
            self._bar.update(max(0, step - self._progress_step))
            if self.progress_key in host:
                self._bar.set_postfix({self.progress_key: f"{host[self.progress_key]:.4g}"}, refresh=False)
        self._progress_step = max(self._progress_step, step)
        if step % self.log_every == 0:
            now = time.perf_counter()
            record = dict(host)
            if self._last_written is not None and step > self._last_written[0]:
                rate = (step - self._last_written[0]) / max(now - self._last_written[1], 1e-9)
                record["steps_per_sec"] = rate
                record["step_time"] = 1.0 / rate
                record.update({name: amount * rate for name, amount in self.per_step.items()})
            self._last_written = (step, now)
            self.write_scalars(step, record)
        if self.nan_guard is not None:
            self.nan_guard.check(step, host)  # after writing, so the bad values are on record
        return host

    def write_scalars(self, step: int, scalars: Mapping[str, float], jsonl: bool = True) -> None:
        """Writes host scalars for `step` now (TensorBoard and, unless `jsonl` is False, one metrics.jsonl line:
        scalars that are not the step's training metrics, such as demo scores, would replace them in
        `read_metrics`, which keeps the last line of a step)."""
        if not self.is_main:
            return
        values = {name: float(value) for name, value in scalars.items()}
        if jsonl:
            self._jsonl.write(json.dumps({"step": int(step), **{k: _json_value(v) for k, v in values.items()}},
                                         allow_nan=False) + "\n")
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, int(step))

    # ---- media ------------------------------------------------------------------------------------------------

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An image [H, W, 3] (uint8, or float in [0, 1]) to TensorBoard."""
        if self._writer is not None:
            self._writer.add_image(name, np.asarray(image), int(step), dataformats="HWC")

    def write_audio(self, step: int, name: str, audio: np.ndarray, sample_rate: int) -> None:
        """Audio [channels, samples] or [samples], clipped to [-1, 1], to TensorBoard."""
        if self._writer is None:
            return
        audio = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
        frames = audio.T if audio.ndim == 2 else audio[:, None]  # tensorboardX wants [samples, channels]
        self._writer.add_audio(name, frames, int(step), sample_rate=int(sample_rate))

    def write_spectrogram(self, step: int, name: str, audio: np.ndarray, sample_rate: int) -> None:
        """The log-mel spectrogram image of `audio` (channel mean) to TensorBoard."""
        if self._writer is not None:
            from musicdiff.audio.spectrogram import spectrogram_image

            self.write_image(step, name, spectrogram_image(np.asarray(audio), sample_rate))

    def write_text(self, step: int, name: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(name, text, int(step))

    def close(self, process_pending: bool = True) -> None:
        """Processes the queued step (unless told not to), then closes the files. Idempotent."""
        try:
            if process_pending and self._pending is not None:
                self.flush()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # While an error propagates, the queued step is dropped: fetching it could only raise a second error.
        self.close(process_pending=exc_type is None)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Reads metrics.jsonl back, non-finite strings as floats; for a repeated step the later line wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = {k: float(v) if isinstance(v, str) else v for k, v in record.items()}
    return [by_step[step] for step in sorted(by_step)]


__all__ = ["MetricLogger", "NanGuard", "NonFiniteLossError", "read_metrics"]

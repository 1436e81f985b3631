"""Grain pipelines from clip records to fixed-size training examples (and to covering windows for precompute).

A source is any random-access sequence of *clip records*: dicts with
`audio` (a file path, or the bytes of an encoded file), `caption` (str), `frames` and `sample_rate` (of the source
file), `peak_db` and `rms_db` (whole-file levels, for normalisation) and `index` (the record's position).
`AudioFolderSource` makes them from a scan; data_pipelines.tfds_audio_folder makes them from a TFDS ArrayRecord build.

Each example is a dict:
- audio: float32 [channels, sample_size], resampled to the model rate (soxr HQ), channel policy applied, zero-padded
- padding_mask: float32 [sample_size], 1.0 on real samples
- seconds_start: float32, floor of the window's offset in seconds; seconds_total: float32, ceil of the clip's duration
  (as stable-audio-tools' timing conditioning)
- caption: str (batches into a NumPy unicode array); index: int64 record index; offset: int64 window start in samples

Only the source frames a window needs are decoded (musicdiff.audio.io.load_audio), so long files cost about a window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain
import ml_collections
import numpy as np

from data_pipelines.audio_folder import AudioItem
from musicdiff.audio.io import NORMALIZE_MODES, load_audio, normalization_gain, resampled_length
from musicdiff.errors import ConfigError, DataError

_DECODE_ERRORS = (RuntimeError, OSError, ValueError, EOFError)


@dataclass(frozen=True)
class ClipSpec:
    """What every example looks like: rate, length, channels, normalisation, crop policy."""

    sample_rate: int
    sample_size: int
    channels: int = 2
    normalize: str = "none"
    random_crop: bool = True

    def __post_init__(self):
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"config.data.normalize={self.normalize!r}: choose one of {', '.join(NORMALIZE_MODES)}")
        if self.channels not in (1, 2):
            raise ConfigError(f"config.data.channels={self.channels}: must be 1 (mono) or 2 (stereo)")
        if self.sample_size <= 0:
            raise ConfigError(f"config.data.sample_size={self.sample_size}: must be positive")

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict) -> ClipSpec:
        return cls(int(data.sample_rate), int(data.sample_size), int(data.channels), str(data.normalize),
                   bool(data.random_crop))


class AudioFolderSource:
    """Grain RandomAccessDataSource over the usable items of an audio-folder scan (picklable for worker processes)."""

    def __init__(self, items: Sequence[AudioItem]):
        self._items = tuple(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._items[index]
        return dict(audio=item.path, caption=item.caption, frames=item.frames, sample_rate=item.sample_rate,
                    peak_db=item.peak_db, rms_db=item.rms_db, index=int(index))

    def __repr__(self) -> str:
        return f"AudioFolderSource(len={len(self)})"

    def clip_lengths(self) -> list[tuple[int, int]]:
        """(frames, sample_rate) of every record, without decoding."""
        return [(item.frames, item.sample_rate) for item in self._items]

    def metadata(self, index: int) -> dict[str, Any]:
        """The manifest fields of a record (as data_pipelines.tfds_audio_folder.TfdsAudioSource.metadata)."""
        item = self._items[index]
        return {"path": item.relpath, "caption": item.caption, "license": item.license, "title": item.title or "",
                "artist": item.artist or "", "attributes": dict(item.attributes)}


def make_example(record: dict[str, Any], offset: int, spec: ClipSpec) -> dict[str, Any]:
    """The example for the window starting `offset` samples (at the model rate) into the record's clip."""
    try:
        audio = load_audio(record["audio"], spec.sample_rate, spec.channels, offset, spec.sample_size)
    except _DECODE_ERRORS as err:
        where = record["audio"] if isinstance(record["audio"], str) else f"record {record['index']}"
        raise DataError(f"{where}: could not be decoded ({err}); it passed the scan, so it has changed since: "
                        "re-run launch.inspect_data") from None
    real = audio.shape[1]
    padded = np.zeros((spec.channels, spec.sample_size), np.float32)
    padded[:, :real] = audio
    gain = normalization_gain(spec.normalize, float(record["peak_db"]), float(record["rms_db"]))
    if gain != 1.0:
        padded *= np.float32(gain)
    mask = np.zeros(spec.sample_size, np.float32)
    mask[:real] = 1.0
    return {
        "audio": padded,
        "padding_mask": mask,
        "seconds_start": np.float32(math.floor(offset / spec.sample_rate)),
        "seconds_total": np.float32(math.ceil(record["frames"] / record["sample_rate"])),
        "caption": str(record["caption"]),
        "index": np.int64(record["index"]),
        "offset": np.int64(offset),
    }


def crop_offset(record: dict[str, Any], spec: ClipSpec, rng: np.random.Generator | None) -> int:
    """Window start: uniform over every full window of the clip (0 when the clip is shorter or rng is None)."""
    total = resampled_length(int(record["frames"]), int(record["sample_rate"]), spec.sample_rate)
    slack = max(0, total - spec.sample_size)
    return int(rng.integers(0, slack + 1)) if rng is not None and slack else 0


class DecodeCrop(grain.transforms.RandomMap):
    """Record to example: a random window (per-record seed from Grain) or, with random_crop off, the first one."""

    def __init__(self, spec: ClipSpec):
        self.spec = spec

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        offset = crop_offset(record, self.spec, rng if self.spec.random_crop else None)
        return make_example(record, offset, self.spec)


class DecodeWindow(grain.transforms.Map):
    """(record index, offset) to the example of that window."""

    def __init__(self, source: Sequence[dict[str, Any]], spec: ClipSpec):
        self.source = source
        self.spec = spec

    def map(self, window: tuple[int, int]) -> dict[str, Any]:
        index, offset = window
        return make_example(self.source[int(index)], int(offset), self.spec)


def process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


class ProcessRows(grain.MapDataset):
    """This process's share of a stream of global batches: element n is element (n // b) · B + rows[n % b] of the
    parent, where B is the global batch size and `rows` (b of them) the rows of each global batch that this
    process feeds. Batching it by b gives exactly those rows of every global batch; a finite parent is cut to whole
    global batches, so every process yields the same number of batches (multi-host steps stay in lockstep)."""

    def __init__(self, parent: grain.MapDataset, rows: Sequence[int], global_batch_size: int):
        super().__init__(parent)
        self._rows = tuple(int(r) for r in rows)
        self._global = int(global_batch_size)
        self._length = len(parent) // self._global * len(self._rows)

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        batch, row = divmod(int(index), len(self._rows))
        return batch * self._global + self._rows[row]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessRows(rows={self._rows[0]}..{self._rows[-1]} ({len(self._rows)}) of {self._global})"


def process_rows(batch_size: int, process_index: int | None, process_count: int | None,
                 batch_rows: Sequence[int] | None = None,
                 global_batch_size: int | None = None) -> tuple[tuple[int, ...], int]:
    """(rows of each global batch this process reads, global batch size).

    Default: process p of P reads the contiguous block [p·b, (p+1)·b) of a global batch of P·b (b = `batch_size`,
    the per-process batch), which is how a mesh laid out process by process splits the batch. Trainers pass the
    rows their batch sharding actually gives the process (musicdiff.parallel.sharding.process_batch_rows)."""
    if batch_rows is None:
        process_index, process_count = process_slice(process_index, process_count)
        return tuple(range(process_index * batch_size, (process_index + 1) * batch_size)), batch_size * process_count
    rows = tuple(int(r) for r in batch_rows)
    if global_batch_size is None or len(rows) != batch_size or not rows or \
            not all(0 <= r < global_batch_size for r in rows) or len(set(rows)) != len(rows):
        raise ValueError(f"batch_rows {rows[:8]}... ({len(rows)} rows) must be {batch_size} distinct rows of the "
                         f"global batch of {global_batch_size}")
    return rows, int(global_batch_size)


def shard_for_process(ds: grain.MapDataset, rows: Sequence[int], global_batch_size: int) -> grain.MapDataset:
    """`ds` (a stream of examples, global batch after global batch) cut to this process's rows (ProcessRows).
    Apply randomness before this, so every example's seed is its global position, whatever the process count."""
    if tuple(rows) == tuple(range(global_batch_size)):
        return ds
    return ProcessRows(ds, rows, global_batch_size)


def training_dataset(
    source: Sequence[dict[str, Any]],
    data: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    batch_rows: Sequence[int] | None = None,
    global_batch_size: int | None = None,
) -> grain.IterDataset:
    """Shuffled, repeated (`num_epochs` None: forever), process-sharded batches of `data.batch_size` examples (per
    process): this process's rows of each global batch (`process_rows`: by default the p-th block of P).

    Order follows `data.shuffle_seed` (reshuffled each epoch), crops follow `seed`; the same seeds give the same
    global batches for any worker or process count. Checkpoint with `iterator.get_state()` / `set_state(state)`.
    """
    if len(source) == 0:
        raise DataError("the data source is empty: no usable clips (run launch.inspect_data to see why)")
    rows, global_batch = process_rows(int(data.batch_size), process_index, process_count, batch_rows,
                                      global_batch_size)
    spec = ClipSpec.from_config(data)
    ds = grain.MapDataset.source(source).shuffle(seed=int(data.shuffle_seed)).repeat(num_epochs)
    # Crops are seeded by the global position (random_map before sharding; decoding stays lazy), so P processes
    # together see exactly the examples one process would.
    ds = ds.random_map(DecodeCrop(spec), seed=int(seed))
    ds = shard_for_process(ds, rows, global_batch)
    return _batched(ds, data)


def window_dataset(
    source: AudioFolderSource,
    data: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Unbatched examples of consecutive `sample_size` windows covering every clip in order, no randomness.

    `source` needs `clip_lengths()` (AudioFolderSource, tfds_audio_folder.TfdsAudioSource) to lay out the windows.

    Sharded like training data but without cutting: every window is on exactly one process. Batch with
    `.batch(n)` (keeping the last partial batch) to cover everything.
    """
    process_index, process_count = process_slice(process_index, process_count)
    spec = ClipSpec.from_config(data)
    ds = grain.MapDataset.source(window_layout(source.clip_lengths(), spec))
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.map(DecodeWindow(source, spec))


def window_layout(clip_lengths: Sequence[tuple[int, int]], spec: ClipSpec) -> list[tuple[int, int]]:
    """(record index, start sample at the model rate) of every consecutive `sample_size` window, clip by clip."""
    windows = []
    for index, (frames, rate) in enumerate(clip_lengths):
        total = resampled_length(frames, rate, spec.sample_rate)
        windows.extend((index, start) for start in range(0, max(total, 1), spec.sample_size))
    return windows


def _batched(ds: grain.MapDataset, data: ml_collections.ConfigDict) -> grain.IterDataset:
    return batch_examples(ds, batch_size=int(data.batch_size), read_threads=int(data.get("read_threads", 0)),
                          num_workers=int(data.num_workers))


def batch_examples(ds: grain.MapDataset, *, batch_size: int, read_threads: int = 0, num_workers: int = 0,
                   drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of `batch_size` examples, read on `read_threads` threads or in `num_workers` worker processes."""
    # Decoding happens in the read threads (libsndfile and soxr release the GIL) or in worker processes.
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * read_threads, 1))
    it = ds.to_iter_dataset(read_options).batch(batch_size, drop_remainder=drop_remainder)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return it

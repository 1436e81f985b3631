"""Renders the synthetic dataset into an audio folder (the format of data_pipelines.audio_folder).

    ROOT/audio/NNNNNN.wav     16-bit PCM stereo WAV, one per clip
    ROOT/manifest.jsonl       one JSON object per clip: path, caption, license, attributes, title, artist
    ROOT/dataset_info.json    the generator config and the clip count

Clip `i` uses seed `config.seed * CLIP_SEED_STRIDE + i`, so a clip can be re-rendered alone from its `seed` attribute
and datasets with different base seeds do not share clips. Workers render and write WAVs in parallel; the manifest and
dataset_info are written last, each atomically (musicdiff.files), so a reader never sees a partial one.
Rewriting a folder with fewer clips deletes the extra NNNNNN.wav of the earlier run, so the folder matches its manifest.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import time
from pathlib import Path
from typing import Any

import ml_collections
from tqdm import tqdm

from data_pipelines.synthetic import captions, render
from musicdiff.audio.io import write_audio
from musicdiff.config import to_dict
from musicdiff.errors import ConfigError
from musicdiff.files import atomic_write_text

CLIP_SEED_STRIDE = 1_000_000
AUDIO_DIR = "audio"
MANIFEST_NAME = "manifest.jsonl"
INFO_NAME = "dataset_info.json"
BPM_LIMITS = (40, 240)

log = logging.getLogger(__name__)


def clip_seed(base_seed: int, index: int) -> int:
    return base_seed * CLIP_SEED_STRIDE + index


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses settings that would fail inside a worker, naming the key and the fix."""
    if config.num_clips < 1 or config.num_clips > CLIP_SEED_STRIDE:
        raise ConfigError(f"config.num_clips={config.num_clips}: must be between 1 and {CLIP_SEED_STRIDE}")
    if not config.seconds > 0:
        raise ConfigError(f"config.seconds={config.seconds}: must be a positive clip length, e.g. 10.0")
    if config.sample_rate < 8000:
        raise ConfigError(f"config.sample_rate={config.sample_rate}: use at least 8000 Hz, e.g. 44100")
    if config.seed < 0:
        raise ConfigError(f"config.seed={config.seed}: must be a non-negative integer")
    if config.num_workers < 0:
        raise ConfigError(f"config.num_workers={config.num_workers}: use 0 (one per CPU) or a positive count")
    low, high = BPM_LIMITS
    if not low <= config.bpm_min <= config.bpm_max <= high:
        raise ConfigError(
            f"config.bpm_min={config.bpm_min}, config.bpm_max={config.bpm_max}: need {low} <= bpm_min <= bpm_max "
            f"<= {high}")
    if config.get("bpm_step", 1) < 1:
        raise ConfigError(f"config.bpm_step={config.bpm_step}: use a positive step in BPM (1 = every whole BPM)")
    unknown = [name for name in config.instruments if name not in render.ALL_INSTRUMENTS]
    if unknown or not config.instruments:
        problem = "unknown " + ", ".join(unknown) if unknown else "empty"
        raise ConfigError(f"config.instruments={tuple(config.instruments)!r}: {problem}; choose from "
                          f"{', '.join(render.ALL_INSTRUMENTS)}")


def _render_and_write(task: tuple[int, int, float, int, tuple[int, int], int, tuple[str, ...], str]) -> dict[str, Any]:
    """Worker: one clip rendered and written; returns its manifest entry."""
    index, seed, seconds, sample_rate, bpm_range, bpm_step, instruments_allowed, root = task
    clip = render.render_clip(seed, seconds, sample_rate, bpm_range=bpm_range, bpm_step=bpm_step,
                              instruments_allowed=instruments_allowed)
    relpath = f"{AUDIO_DIR}/{index:06d}.wav"
    write_audio(Path(root) / relpath, clip.audio, sample_rate, subtype="PCM_16")
    return {"path": relpath, "caption": clip.caption, "license": clip.license, "attributes": clip.attributes,
            "title": clip.title, "artist": clip.artist}


def write_dataset(config: ml_collections.ConfigDict, root: str | os.PathLike, progress: bool = False) -> dict[str, Any]:
    """Renders `config.num_clips` clips into the audio folder `root`; returns a summary (clips, hours, seconds)."""
    check_config(config)
    root = Path(root)
    (root / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    bpm_step = int(config.get("bpm_step", 1))  # configs written before the key existed: every whole BPM
    tasks = [(i, clip_seed(config.seed, i), float(config.seconds), int(config.sample_rate),
              (int(config.bpm_min), int(config.bpm_max)), bpm_step, tuple(config.instruments), str(root))
             for i in range(config.num_clips)]
    workers = min(config.num_workers or os.cpu_count() or 1, len(tasks))
    started = time.perf_counter()
    bar = tqdm(total=len(tasks), desc="rendering clips", unit="clip", disable=not progress)
    entries = []
    if workers == 1:
        for task in tasks:
            entries.append(_render_and_write(task))
            bar.update()
    else:
        chunksize = max(1, math.ceil(len(tasks) / (workers * 8)))  # small chunks keep the bar moving and loads even
        with multiprocessing.get_context().Pool(workers) as pool:
            for entry in pool.imap(_render_and_write, tasks, chunksize=chunksize):
                entries.append(entry)
                bar.update()
    bar.close()
    atomic_write_text(root / MANIFEST_NAME, "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
    stale = _remove_stale_clips(root, {entry["path"] for entry in entries})
    audio_seconds = len(entries) * float(config.seconds)
    info = {
        "generator": "data_pipelines.synthetic",
        "count": len(entries),
        "hours": audio_seconds / 3600.0,
        "sample_rate": int(config.sample_rate),
        "channels": 2,
        "format": "WAV PCM_16",
        "license": captions.LICENSE,
        "clip_seed": f"{config.seed} * {CLIP_SEED_STRIDE} + index",
        "config": to_dict(config),
    }
    atomic_write_text(root / INFO_NAME, json.dumps(info, indent=2) + "\n")
    return {"root": str(root), "clips": len(entries), "hours": audio_seconds / 3600.0,
            "seconds_taken": time.perf_counter() - started, "workers": workers, "stale_clips_removed": stale}


def _remove_stale_clips(root: Path, listed: set[str]) -> int:
    """Deletes clips of an earlier, larger run (our own NNNNNN.wav names only) so the folder matches its manifest."""
    stale = [path for path in (root / AUDIO_DIR).glob("*.wav")
             if re.fullmatch(r"\d{6}\.wav", path.name) and f"{AUDIO_DIR}/{path.name}" not in listed]
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d clips of an earlier run from %s", len(stale), root / AUDIO_DIR)
    return len(stale)


def prepare_dataset(config: ml_collections.ConfigDict, root: str | os.PathLike) -> dict[str, Any]:
    """launch.prepare_data: renders the set with a progress bar and prints what it wrote."""
    summary = write_dataset(config, root, progress=True)
    print(f"wrote {summary['clips']} clips ({summary['hours']:.3f} h of audio) to {summary['root']} in "
          f"{summary['seconds_taken']:.1f} s with {summary['workers']} worker(s)")
    print(json.dumps(summary))
    return summary

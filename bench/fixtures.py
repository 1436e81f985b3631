"""Inputs the benchmark rows generate for themselves: WAV folders with a manifest, a random tiny autoencoder
checkpoint, and the decode-only ceiling the data-pipeline row is compared with."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
from flax import nnx

from musicdiff.config import load_config
from musicdiff.models import registry
from musicdiff.checkpoints import Checkpointer

REPO = Path(__file__).resolve().parents[1]


def write_wav_folder(root: Path, clips: int, seconds: float, rate: int) -> Path:
    """`clips` stereo 16-bit WAVs of tones plus noise and a manifest.jsonl (captions, CC0) in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    lines = []
    for k in range(clips):
        tone = 0.3 * np.sin(2 * np.pi * (110.0 + 7 * k) * t)
        audio = np.stack([tone, np.roll(tone, 100)], 1) + rng.normal(0, 0.01, (len(t), 2))
        soundfile.write(root / f"clip{k:03d}.wav", audio.astype(np.float32), rate, subtype="PCM_16")
        lines.append(json.dumps({"path": f"clip{k:03d}.wav", "caption": f"bench clip {k} with a warm tone",
                                 "license": "CC0-1.0"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_autoencoder_checkpoint(directory: Path) -> Path:
    """A randomly initialised configs/autoencoder.py:tiny saved as its trainer saves it."""
    config = load_config(str(REPO / "configs" / "autoencoder.py") + ":tiny")
    model = registry.build(config.autoencoder, nnx.Rngs(0))
    with Checkpointer(directory / "checkpoints", save_interval_steps=1, async_save=False) as checkpointer:
        checkpointer.save(0, {"params": {"autoencoder": nnx.state(model, nnx.Param)}}, config=config, force=True)
    return directory


def decode_ceiling_clips_per_second(root: Path, crop_samples: int, threads: int, clips: int) -> float:
    """Clips/s of reading a crop of `crop_samples` frames at the start of each file with soundfile alone (no
    resampling, no batching), `threads` at a time: the file-decode ceiling the pipeline row is compared with."""
    files = sorted(root.glob("*.wav"))

    def read(index: int) -> None:
        soundfile.read(files[index % len(files)], frames=crop_samples, dtype="float32", always_2d=True)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(read, range(len(files))))  # warm the page cache
        began = time.perf_counter()
        list(pool.map(read, range(clips)))
        return clips / (time.perf_counter() - began)

"""Shared fixtures of the precompute tests: a random tiny autoencoder checkpoint and a small audio folder whose
window count is known in closed form."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import soundfile

from musicdiff.config import load_config
from tests.model_fixtures import random_autoencoder

REPO = Path(__file__).resolve().parents[1]
PRECOMPUTE_CONFIG = str(REPO / "configs" / "precompute.py")
RATE = 44100
SAMPLE_SIZE = 8192  # 32 latent frames of the tiny autoencoder (256x)
# name -> (samples, caption); the last two are skipped by the scan (too short, no licence)
CLIPS = {
    "a.wav": (44100, "warm piano"),
    "b.wav": (66150, "warm piano"),
    "c.wav": (88200, "bright synth lead"),
    "d.wav": (52920, "slow ambient pad with soft drums"),
    "e.wav": (79380, "fast techno with a deep bass line"),
}
TOO_SHORT = ("short.wav", 13230)
UNLICENSED = "nolicense.wav"
EXPECTED_WINDOWS = sum(math.ceil(samples / SAMPLE_SIZE) for samples, _ in CLIPS.values())  # 6+9+11+7+10 = 43
BASE_OVERRIDES = (f"data.sample_size={SAMPLE_SIZE}", "data.min_seconds=0.5", "batch_size=8", "windows_per_shard=16",
                  "data.read_threads=1")


def save_autoencoder(workdir: Path, seed: int = 0, step: int = 0) -> Path:
    return random_autoencoder(workdir, seed=seed, step=step)


def write_audio_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for k, (name, (samples, caption)) in enumerate(CLIPS.items()):
        t = np.arange(samples) / RATE
        tone = 0.3 * np.sin(2 * np.pi * (180.0 + 90 * k) * t) + 0.02 * rng.standard_normal(samples)
        soundfile.write(root / name, np.stack([tone, -tone], 1).astype(np.float32), RATE, subtype="FLOAT")
        lines.append({"path": name, "caption": caption, "license": "CC0-1.0", "attributes": {"clip": k}})
    name, samples = TOO_SHORT
    soundfile.write(root / name, 0.3 * np.ones((samples, 2), np.float32), RATE, subtype="FLOAT")
    lines.append({"path": name, "caption": "too short", "license": "CC0-1.0"})
    soundfile.write(root / UNLICENSED, 0.3 * np.ones((RATE, 2), np.float32), RATE, subtype="FLOAT")
    lines.append({"path": UNLICENSED, "caption": "no licence"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def overrides(checkpoint: Path, root: Path, *extra: str) -> list[str]:
    return [f"autoencoder_checkpoint={checkpoint}", f"data.root={root}", *BASE_OVERRIDES, "progress=False", *extra]


def precompute_config(checkpoint: Path, root: Path, *extra: str, preset: str = "tiny"):
    return load_config(f"{PRECOMPUTE_CONFIG}:{preset}", overrides(checkpoint, root, *extra))


def cli_args(checkpoint: Path, root: Path, workdir: Path, *extra: str) -> list[str]:
    """Arguments of `python -m launch.precompute_latents` (the progress bar on, as users see it)."""
    flags = [f"--config.{o}" for o in overrides(checkpoint, root, *extra) if o != "progress=False"]
    return ["-m", "launch.precompute_latents", f"--config={PRECOMPUTE_CONFIG}:tiny", *flags, f"--workdir={workdir}"]


def output_files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` except config.json (rewritten by the CLI on every run), by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "config.json"}

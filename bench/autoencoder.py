"""python -m bench.autoencoder [--seconds=4] [--batch=1] [--repeats=5] [--train_preset=tiny]

- Encode and decode throughput of the Stable Audio Open-size Oobleck VAE (configs/autoencoder.py:sao, 156 M
  parameters) in float32 on this machine: seconds of audio per second of wall time for `batch` clips of `seconds`
  each (unchunked, posterior-mean encode), the median of `repeats` timed runs after one warm-up run; compile time
  is reported separately.
- The train step time of the tiny preset at its own batch and crop size, per kind of step (warm-up generator,
  adversarial generator, discriminator; musicdiff.training.autoencoder), also median of `repeats` after a warm-up.

Weights are random (throughput does not depend on their values). Writes bench/results/autoencoder-HOST-DATE.json.
`codec_throughput`, `train_step_times` and `run` are importable (the PyTorch side-by-side harness calls them).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from musicdiff.parallel.sharding import unsharded

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "autoencoder.py"
RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn, *args, repeats: int) -> dict[str, Any]:
    """Compile seconds, then one warm-up run, then `repeats` timed runs (block_until_ready each)."""
    start = time.perf_counter()
    with unsharded():  # one device, as the reference
        compiled = jax.jit(fn).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return {"compile_seconds": round(compile_seconds, 2), "median_seconds": round(statistics.median(times), 4),
            "seconds": [round(t, 4) for t in times]}


def codec_throughput(seconds: float = 4.0, batch: int = 1, repeats: int = 5, preset: str = "sao") -> dict[str, Any]:
    """Encode and decode speed of `preset`'s autoencoder on `batch` random clips of `seconds` (see the docstring)."""
    from musicdiff.config import load_config
    from musicdiff.models import registry

    config = load_config(f"{CONFIG}:{preset}")
    model = registry.build(config.autoencoder, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rate, ratio = int(model.config.sample_rate), model.downsampling_ratio
    samples = int(round(seconds * rate / ratio)) * ratio
    audio = 0.1 * jax.random.normal(jax.random.key(1), (batch, model.config.in_channels, samples), jnp.float32)

    def encode(params, audio):
        return nnx.merge(graphdef, params).encode(audio, sample=False)[0]

    def decode(params, latents):
        return nnx.merge(graphdef, params).decode(latents)

    with unsharded():
        latents = jax.jit(encode)(params, audio)
    audio_seconds = batch * samples / rate
    result = {"preset": preset, "parameters": int(sum(x.size for x in jax.tree.leaves(params))), "batch": batch,
              "seconds_per_clip": samples / rate, "samples": samples, "latent_frames": int(latents.shape[-1]),
              "dtype": str(config.autoencoder.dtype)}
    for name, fn, x in (("encode", encode, audio), ("decode", decode, latents)):
        timing = _timed(fn, params, x, repeats=repeats)
        timing["audio_seconds_per_second"] = round(audio_seconds / timing["median_seconds"], 3)
        result[name] = timing
    return result


def train_step_times(preset: str = "tiny", repeats: int = 5) -> dict[str, Any]:
    """Seconds per train step of `preset` at its batch and crop size, for each kind of step, on one device."""
    from musicdiff.config import load_config
    from musicdiff.parallel import make_mesh, mesh_config
    from musicdiff.training import loop
    from musicdiff.training.autoencoder import STEP_KINDS, AutoencoderTrainer

    # Warm-up 2 of "adv": steps 0.. are warm-up generator, discriminator, generator, ...: every kind is reachable.
    config = load_config(f"{CONFIG}:{preset}", ["training.warmup_steps=2", "training.warmup_mode=adv"])
    trainer = AutoencoderTrainer(config)
    mesh = make_mesh(mesh_config(data=1), jax.devices()[:1])
    rules = config.sharding_rules
    state, shardings = loop.init_state(trainer.init_state, mesh, rules, jax.random.key(0))
    batch_size, samples = int(config.batch_size), int(config.data.sample_size)
    t = np.arange(samples) / float(config.data.sample_rate)
    freqs = np.random.default_rng(0).uniform(100, 4000, (batch_size, 2, 1))
    batch = {"audio": (0.3 * np.sin(2 * np.pi * freqs * t)).astype(np.float32)}
    batch_sharding = loop.batch_shardings(batch, mesh, rules)
    device_batch = loop.shard_batch(batch, mesh, rules)
    result = {"preset": preset, "batch_size": batch_size, "sample_size": samples,
              "audio_seconds_per_step": batch_size * samples / float(config.data.sample_rate)}
    for kind in sorted(trainer.kinds):
        step = loop.compile_step(trainer.step(kind), shardings, batch_sharding, mesh, rules)
        start = time.perf_counter()
        compiled = step.lower(state, device_batch).compile()
        compile_seconds = time.perf_counter() - start
        state, metrics = compiled(state, device_batch)  # warm-up (the state is donated: thread it through)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            state, metrics = compiled(state, device_batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        result[STEP_KINDS[kind]] = {"compile_seconds": round(compile_seconds, 2),
                                    "median_seconds": round(statistics.median(times), 4),
                                    "seconds": [round(x, 4) for x in times]}
    return result


def run(seconds: float = 4.0, batch: int = 1, repeats: int = 5, train_preset: str = "tiny") -> dict[str, Any]:
    """Both measurements and the machine they ran on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "benchmark": "autoencoder",
        "host": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cores": cores,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "codec": codec_throughput(seconds, batch, repeats),
        "train_step": train_step_times(train_preset, repeats),
    }


SECONDS = flags.DEFINE_float("seconds", 4.0, "seconds of audio per clip for encode/decode")
BATCH = flags.DEFINE_integer("batch", 1, "clips per encode/decode call")
REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per measurement (the median is reported)")
TRAIN_PRESET = flags.DEFINE_string("train_preset", "tiny", "configs/autoencoder.py preset of the train step timing")


def main(argv: list[str]) -> None:
    del argv
    report = run(SECONDS.value, BATCH.value, REPEATS.value, TRAIN_PRESET.value)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"autoencoder-{report['host']}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    codec, train = report["codec"], report["train_step"]
    print(f"SAO VAE ({codec['parameters']:,} params, fp32, batch {codec['batch']} x {codec['seconds_per_clip']:.2f} s): "
          f"encode {codec['encode']['audio_seconds_per_second']:.2f} and decode "
          f"{codec['decode']['audio_seconds_per_second']:.2f} s of audio per s "
          f"(compile {codec['encode']['compile_seconds']:.1f} s / {codec['decode']['compile_seconds']:.1f} s)")
    for name in ("generator_warmup", "generator", "discriminator"):
        if name in train:
            print(f"{train['preset']} train step, {name}: {train[name]['median_seconds']:.3f} s "
                  f"({train['audio_seconds_per_step']:.2f} s of audio; compile {train[name]['compile_seconds']:.1f} s)")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)

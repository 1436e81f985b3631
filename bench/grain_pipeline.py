"""python -m bench.grain_pipeline [--clips=64] [--seconds=10] [--measure_clips=512]

Clips per second through the real audio-folder pipeline (scan, then Grain: decode, soxr resample 48 -> 44.1 kHz,
channel policy, random crop to sample_size, batch) on this machine, for a few worker/thread settings. Fixture WAVs
(10 s stereo at 48 kHz) are generated into a temporary folder. Writes bench/results/grain_pipeline-HOST-DATE.json.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from bench.fixtures import write_wav_folder
from data_pipelines.audio_folder import scan
from data_pipelines.grain_pipeline import AudioFolderSource, training_dataset
from musicdiff.audio.io import load_audio
from musicdiff.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "audio_folder.py"
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_CLIPS_PER_SECOND = 50.0

# absl flags (not argparse): Grain's worker processes read absl flags, which must be parsed first.
CLIPS = flags.DEFINE_integer("clips", 64, "fixture clips to generate")
SECONDS = flags.DEFINE_float("seconds", 10.0, "length of each fixture clip")
RATE = flags.DEFINE_integer("rate", 48000, "fixture sample rate (the pipeline resamples to 44.1 kHz)")
MEASURE_CLIPS = flags.DEFINE_integer("measure_clips", 512, "clips timed per setting, after two warm-up batches")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "examples per batch")


def measure(source, config, measure_clips: int) -> float:
    batch_size = config.data.batch_size
    iterator = iter(training_dataset(source, config.data, seed=0, process_index=0, process_count=1))
    for _ in range(2):  # warm-up: worker start-up and first reads
        next(iterator)
    batches = max(1, measure_clips // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["audio"].shape == (batch_size, 2, config.data.sample_size)
    return batches * batch_size / elapsed


def whole_file_clips_per_second(result, sample_size: int) -> float:
    """The same decode without partial reads (whole file decoded and resampled, then cropped), one thread: what the
    crop-only read saves."""
    start = time.perf_counter()
    for item in result.items:
        load_audio(item.path, 44100)[:, :sample_size]
    return len(result.items) / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    del argv
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    with tempfile.TemporaryDirectory(prefix="grain_bench_") as tmp:
        root = Path(tmp)
        write_wav_folder(root, CLIPS.value, SECONDS.value, RATE.value)
        base = [f"root={root}", f"data.batch_size={BATCH_SIZE.value}"]
        start = time.perf_counter()
        result = scan(load_config(str(CONFIG), base))
        scan_seconds = time.perf_counter() - start
        source = AudioFolderSource(result.items)
        whole_file = whole_file_clips_per_second(result, load_config(str(CONFIG), base).data.sample_size)
        settings = [dict(num_workers=0, read_threads=0), dict(num_workers=0, read_threads=cores),
                    dict(num_workers=cores, read_threads=1)]
        runs = []
        for setting in settings:
            overrides = base + [f"data.{key}={value}" for key, value in setting.items()]
            config = load_config(str(CONFIG), overrides)
            clips_per_second = measure(source, config, MEASURE_CLIPS.value)
            runs.append({**setting, "clips_per_second": round(clips_per_second, 1)})
            print(f"workers={setting['num_workers']} read_threads={setting['read_threads']}: "
                  f"{clips_per_second:.1f} clips/s", flush=True)

    best = max(runs, key=lambda run: run["clips_per_second"])
    report = {
        "benchmark": "grain_pipeline",
        "host": socket.gethostname(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cores": cores,
        "python": sys.version.split()[0],
        "fixture": {"clips": CLIPS.value, "seconds": SECONDS.value, "sample_rate": RATE.value, "channels": 2},
        "pipeline": {"sample_rate": config.data.sample_rate, "sample_size": config.data.sample_size,
                     "batch_size": BATCH_SIZE.value, "measured_clips": MEASURE_CLIPS.value},
        "scan_seconds": round(scan_seconds, 3),
        "scan_clips_per_second": round(result.usable / scan_seconds, 1),
        "runs": runs,
        "whole_file_decode_clips_per_second_1_thread": round(whole_file, 1),
        "best_clips_per_second": best["clips_per_second"],
        "target_clips_per_second": TARGET_CLIPS_PER_SECOND,
        "meets_target": best["clips_per_second"] >= TARGET_CLIPS_PER_SECOND,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"grain_pipeline-{report['host']}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"best {best['clips_per_second']:.1f} clips/s on {cores} cores (target {TARGET_CLIPS_PER_SECOND:.0f}); "
          f"scan {report['scan_clips_per_second']:.1f} clips/s; whole-file decode (1 thread) {whole_file:.1f} clips/s; "
          f"wrote {out}")


if __name__ == "__main__":
    app.run(main)

"""python -m bench.evaluation_accuracy [--clips=200] [--seconds=10] [--train_clips=320] [--skip_training]

Measures, on freshly rendered synthetic clips (data_pipelines.synthetic, known tempo/key/instruments):
1. the librosa tempo and key estimators of musicdiff.eval.prompt_following (accuracy vs the rendered attributes);
2. the embedded evaluator: wall time of `launch.train_evaluator --config=configs/evaluator.py` on a rendered set
   (16 kHz, 6-s clips) and its held-out attribute accuracy.
Writes bench/results/evaluation_accuracy-HOST-DATE.json (with the machine's load average, since the 2 cores are
shared and the training time depends on it).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_collections
from absl import app, flags

from data_pipelines.audio_folder import scan_folder
from data_pipelines.synthetic.writer import write_dataset
from musicdiff.audio.io import load_audio
from musicdiff.eval import prompt_following
from musicdiff.models import evaluator_labels

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CLIPS = flags.DEFINE_integer("clips", 200, "clips for the tempo/key estimators")
SECONDS = flags.DEFINE_float("seconds", 10.0, "length of the estimator clips (44.1 kHz)")
TRAIN_CLIPS = flags.DEFINE_integer("train_clips", 320, "clips rendered for the evaluator (6 s, 16 kHz)")
SKIP_TRAINING = flags.DEFINE_bool("skip_training", False, "only measure the estimators")


def render(root: Path, clips: int, seconds: float, rate: int, seed: int) -> None:
    config = ml_collections.ConfigDict(dict(num_clips=clips, seconds=seconds, sample_rate=rate, seed=seed,
                                            num_workers=0, bpm_min=70, bpm_max=160,
                                            instruments=("piano", "guitar", "bass", "pad", "organ", "marimba",
                                                         "lead", "drums")))
    write_dataset(config, root)


def estimator_accuracy(root: Path) -> dict:
    per_clip = []
    started = time.perf_counter()
    for item in scan_folder(root).items:
        targets = evaluator_labels.prompt_targets(item.caption, item.attributes)
        per_clip.append(prompt_following.clip_prompt_following(load_audio(item.path, None, None), item.sample_rate,
                                                               targets))
    summary = prompt_following.summarize(per_clip)
    summary["seconds_per_clip"] = (time.perf_counter() - started) / len(per_clip)
    return summary


def evaluator_training(root: Path, workdir: Path) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launch.train_evaluator", "--config=configs/evaluator.py",
                    f"--config.data.root={root}", f"--workdir={workdir}"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dict(wall_seconds=time.perf_counter() - started,
                heldout=json.loads((workdir / "heldout_accuracy.json").read_text()))


def main(_argv) -> None:
    result = dict(host=socket.gethostname(), date=datetime.date.today().isoformat(), cpus=os.cpu_count(),
                  load_average_before=os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp = Path(tmp)
        render(tmp / "estimators", CLIPS.value, SECONDS.value, 44100, seed=11)
        result["estimators"] = dict(clips=CLIPS.value, seconds=SECONDS.value, **estimator_accuracy(tmp / "estimators"))
        print(json.dumps(result["estimators"], indent=2))
        if not SKIP_TRAINING.value:
            render(tmp / "train", TRAIN_CLIPS.value, 6.0, 16000, seed=12)
            result["load_average_before_training"] = os.getloadavg()
            result["evaluator"] = dict(clips=TRAIN_CLIPS.value, **evaluator_training(tmp / "train", tmp / "evaluator"))
            result["load_average_after_training"] = os.getloadavg()
            print(json.dumps(result["evaluator"], indent=2))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"evaluation_accuracy-{result['host']}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)

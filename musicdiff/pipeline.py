"""The demo pipeline (`python -m launch.demo`, `make demo`): every stage on the embedded CC0 set (configs/demo.py).

Renders the music, inspects it, trains the tiny autoencoder and evaluates its reconstructions, precomputes latents,
trains the tiny DiT, trains the embedded evaluator, generates from the DiT's first and last checkpoints and evaluates
both. Each stage runs as its own CLI process (`python -m launch.<cli>`, named by the config) with the command printed
first, so any step can be rerun by hand. Ends with DEMO/summary.md: where to listen, the spectrograms, and the numbers.

This is the one orchestration module: it sits above the stage packages (training, inference, eval) and the launch
CLIs it starts by name; none of them imports it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np

from musicdiff.errors import DataError
from musicdiff.files import atomic_write_json, atomic_write_text


def stage_command(cli: str, config_file: str, overrides: list[str], workdir: Path) -> list[str]:
    return [sys.executable, "-m", f"launch.{cli}", f"--config={config_file}",
            *[f"--config.{o}" for o in overrides], f"--workdir={workdir}"]


def run_stage(name: str, command: list[str], log: Path) -> float:
    print(f"\n=== {name}\n$ {shlex.join(command[2:] if command[1] == '-m' else command)}", flush=True)
    began = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            out.write(line)
            if "\r" not in line:
                sys.stdout.write(line)
        code = process.wait()
    seconds = time.perf_counter() - began
    if code != 0:
        raise DataError(f"demo stage '{name}' failed with exit code {code}; its output is in {log}")
    print(f"--- {name}: {seconds:.0f} s", flush=True)
    return seconds


def preview_clips(data_dir: Path, out: Path, count: int) -> list[dict]:
    """Captions and spectrogram PNGs of the first rendered clips."""
    from musicdiff.audio.io import load_audio
    from musicdiff.audio.spectrogram import save_spectrogram_png

    out.mkdir(parents=True, exist_ok=True)
    entries = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()[:count]]
    for number, entry in enumerate(entries):
        audio = load_audio(str(data_dir / entry["path"]), 44100, 2)
        save_spectrogram_png(audio, 44100, out / f"clip_{number}.png", title=entry["caption"][:80])
        print(f"  clip {number}: {entry['caption']}")
    return entries


def loss_summary(metrics_file: Path, window: int = 100) -> dict:
    from musicdiff.metrics import read_metrics

    records = [r for r in read_metrics(metrics_file) if "loss" in r]
    if not records:
        raise DataError(f"{metrics_file}: no training loss was logged; set the diffusion stage's "
                        f"training.log_every below its training.num_steps in configs/demo.py")
    losses = np.array([r["loss"] for r in records])
    steps = np.array([r["step"] for r in records])
    first, last = losses[steps <= window], losses[steps > steps.max() - window]
    return {"first_steps_mean": float(first.mean()), "last_steps_mean": float(last.mean()), "window": window,
            "final_step": int(steps.max())}


def run_demo(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Runs every stage of `config.stages` (configs/demo.py) under WORKDIR/<stage>, then writes WORKDIR/summary.json
    and WORKDIR/summary.md; returns the summary."""
    workdir = Path(workdir).resolve()
    missing = [name for name in config.get("requires", ()) if not (workdir / name).is_dir()]
    if missing:
        raise DataError(f"{workdir}: no {missing[0]}/ folder; this run builds on the demo's outputs: run `make demo` "
                        f"(python -m launch.demo --workdir={workdir}) first")
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # `{name}` in a stage's overrides is WORKDIR/name, for this run's stages and an earlier run's alike.
    names = [name for name, *_ in config.stages] + list(config.get("requires", ()))
    folders = {name: str(workdir / name) for name in names}
    timings = {}
    for name, cli, config_file, overrides in config.stages:
        filled = [o.format(**folders) for o in overrides]
        if config.fast:
            filled += list(config.fast_overrides.get(name, ()))
        timings[name] = run_stage(name, stage_command(cli, config_file, filled, workdir / name), logs / f"{name}.log")
        if name == "data":
            print("\nrendered clips:")
            preview_clips(Path(folders["data"]), workdir / "preview", int(config.preview_clips))
    summary = {"seconds": timings, "total_seconds": sum(timings.values())}
    if config.get("summary", "demo") == "lora":
        return finish_lora_story(summary, workdir, str(config.held_out_instrument))
    summary["autoencoder"] = {
        "step_0": json.loads((workdir / "autoencoder_eval_step0" / "report.json").read_text()),
        "final": json.loads((workdir / "autoencoder_eval" / "report.json").read_text())}
    summary["diffusion_loss"] = loss_summary(workdir / "diffusion" / "metrics.jsonl")
    summary["evaluation"] = json.loads((workdir / "evaluation" / "report.json").read_text())
    summary["spectrogram_grid"] = str(spectrogram_grid(workdir, summary["evaluation"], int(config.preview_clips)))
    atomic_write_json(workdir / "summary.json", summary)
    markdown = summary_markdown(summary, workdir)
    atomic_write_text(workdir / "summary.md", markdown)
    print("\n" + markdown)
    return summary


def summary_markdown(summary: dict, workdir: Path) -> str:
    loss = summary["diffusion_loss"]
    lines = ["# musicdiff demo", "",
             f"Total {summary['total_seconds'] / 60:.1f} min: " + ", ".join(
                 f"{name} {seconds:.0f} s" for name, seconds in summary["seconds"].items()), "",
             f"- Rendered clips and spectrograms: {workdir / 'data'}, {workdir / 'preview'}",
             f"- Autoencoder reconstruction reports: {workdir / 'autoencoder_eval_step0' / 'report.md'} (step 0), "
             f"{workdir / 'autoencoder_eval' / 'report.md'} (final); listen: {workdir / 'autoencoder' / 'demos'}",
             *autoencoder_lines(summary["autoencoder"]),
             f"- Diffusion loss: mean of the first {loss['window']} steps {loss['first_steps_mean']:.4f}, of the last "
             f"{loss['window']} steps {loss['last_steps_mean']:.4f} (step {loss['final_step']})",
             f"- Generated audio (listen here) and spectrograms: {workdir / 'evaluation' / 'generations'}/step_*/",
             f"- Evaluation per checkpoint step: {workdir / 'evaluation' / 'series.png'}", ""]
    lines += evaluation_lines(summary["evaluation"])
    lines += target_lines(summary)
    lines += ["", f"Spectrograms, same caption per row (real clip, its reconstruction, the last checkpoint's "
                  f"generation): {summary['spectrogram_grid']}"]
    return "\n".join(lines) + "\n"


def autoencoder_lines(reports: dict) -> list[str]:
    """Held-out reconstruction scores at step 0 and after training (the issue's bar: mel distance -30%, SI-SDR up)."""
    first, last = reports["step_0"], reports["final"]
    lines = ["", f"| autoencoder (held-out, {last['clips']} clips) | step 0 | step {last['step']} | change |",
             "|---|---|---|---|"]
    for metric in ("mel_distance", "stft_distance", "mrstft_distance", "si_sdr"):
        before, after = first["metrics"][metric]["mean"], last["metrics"][metric]["mean"]
        change = f"{after - before:+.2f} dB" if metric == "si_sdr" else f"{100 * (after - before) / before:+.1f}%"
        lines.append(f"| {metric} | {before:.4g} | {after:.4g} | {change} |")
    return lines + [""]


# The demo summary's metrics, in this order: prompt following by the independent estimators, the evaluator's
# attribute accuracies, then the distribution distances.
SUMMARY_METRICS = ("tempo_acc", "key_acc", "attr_key_acc", "attr_mode_acc", "attr_tempo_bucket_acc",
                   "attr_instrument_f1", "fd_embedded", "kl_embedded")


def evaluation_lines(report: dict, metrics: tuple[str, ...] = SUMMARY_METRICS) -> list[str]:
    """The evaluation table transposed (a row per metric, a column per clip set: the real clips (ceiling), their
    reconstructions, then each checkpoint step, step 0 being the floor), with each metric's verdict."""
    rows = report["rows"]
    names = [m for m in metrics if any(m in row["metrics"] for row in rows)]
    labels = [row["name"] if row["step"] is not None else f"{row['name']} (reference)" for row in rows]
    lines = ["", f"Evaluation of {rows[0]['clips']} held-out prompts ({_crop_text(report)}); value [95% interval]:",
             "", "| metric | " + " | ".join(labels) + " | last step vs step 0 |", "|---" * (len(labels) + 2) + "|"]
    for name in names:
        cells = [_interval(row["metrics"].get(name)) for row in rows]
        verdict = report["verdicts"].get(name, {}).get("verdict", "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    return lines + ["", "A change is called improved (or worse) only where the two intervals do not overlap."]


# The demo issue's bars. Mel distance: half of the 44.1 kHz stereo demo autoencoder's 2.77 of 2026-12-06 (this demo
# runs at 16 kHz mono; the scale of a log-mel distance changes with the rate, so this bar is a guide, not like for
# like); reconstructions and generations are compared by the same estimators on the same held-out prompts.
MEL_DISTANCE_BAR, KEEP_FRACTION, TEMPO_BAR, KEY_BAR = 2.77 / 2, 0.9, 0.5, 0.3
LONG_FRACTION = 0.8  # the long preset's bar: generations reach this fraction of the real clips' score


def target_lines(summary: dict) -> list[str]:
    """Each bar of the demo and whether this run met it, from the numbers above."""
    final = summary["autoencoder"]["final"]["metrics"]
    rows = {row["name"]: row["metrics"] for row in summary["evaluation"]["rows"]}
    last = max((r for r in summary["evaluation"]["rows"] if r["step"] is not None), key=lambda r: r["step"])
    checks = [("autoencoder mel distance", final["mel_distance"]["mean"], f"<= {MEL_DISTANCE_BAR:.3g}",
               final["mel_distance"]["mean"] <= MEL_DISTANCE_BAR),
              ("autoencoder SI-SDR (dB)", final["si_sdr"]["mean"], "> 0", final["si_sdr"]["mean"] > 0)]
    for metric in ("tempo_acc", "key_acc"):
        real, kept = rows.get("real", {}).get(metric), rows.get("autoencoded", {}).get(metric)
        if real and kept:
            bar = KEEP_FRACTION * real["value"]
            checks.append((f"reconstructions' {metric}", kept["value"], f">= {KEEP_FRACTION} x real = {bar:.3g}",
                           kept["value"] >= bar))
    for metric, bar in (("tempo_acc", TEMPO_BAR), ("key_acc", KEY_BAR)):
        if metric in last["metrics"]:
            value = last["metrics"][metric]["value"]
            checks.append((f"{last['name']} {metric}", value, f">= {bar}", value >= bar))
            real = rows.get("real", {}).get(metric)
            if real:
                bar = LONG_FRACTION * real["value"]
                checks.append((f"{last['name']} {metric} (the long preset's bar)", value,
                               f">= {LONG_FRACTION} x real = {bar:.3g}", value >= bar))
    lines = ["", "| bar | this run | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3g} | {target} | {'yes' if met else 'no'} |" for name, value, target, met in checks]
    return lines


def _crop_text(report: dict) -> str:
    seconds = float(report["crop_seconds"])
    return f"every set cropped to its first {seconds:.2f} s" if seconds > 0 else "whole clips"


def _interval(entry: dict | None) -> str:
    return "" if entry is None else f"{entry['value']:.3g} [{entry['lo']:.3g}, {entry['hi']:.3g}]"


def spectrogram_grid(workdir: Path, report: dict, count: int) -> Path:
    """WORKDIR/spectrograms.png: for the first `count` captions found in every set, the real clip, its
    reconstruction and the last checkpoint's generation, side by side, each cut to the evaluated length."""
    from musicdiff.audio.spectrogram import save_spectrogram_grid
    from musicdiff.eval.generation_sets import crop_clips, read_generations

    sets = {"real": workdir / "evaluation" / "rows" / "real",
            "reconstruction": workdir / "autoencoder_eval" / "reconstructions",
            "generation": Path(max((r for r in report["rows"] if r["step"] is not None),
                                   key=lambda r: r["step"])["folder"])}
    seconds = float(report["crop_seconds"])  # the length every set was evaluated at (0: whole clips)
    by_caption = {name: {clip.prompt: clip for clip in crop_clips(read_generations(folder), seconds)}
                  for name, folder in sets.items()}
    captions = [c for c in by_caption["real"] if all(c in clips for clips in by_caption.values())][:count]
    if not captions:
        raise DataError(f"no caption is common to {', '.join(str(f) for f in sets.values())}: the demo's sets do "
                        f"not pair up")
    grid = [[by_caption[name][caption].load() for name in sets] for caption in captions]
    return save_spectrogram_grid(grid, list(sets), captions, workdir / "spectrograms.png")


def finish_lora_story(summary: dict, workdir: Path, instrument: str) -> dict:
    """`make lora-demo`'s summary: how often the held-out instrument is heard in generations for prompts naming it,
    from the DiT that never heard it (the adapter run's step 0) and with the trained adapter, and the adapter's size."""
    from musicdiff.models.weight_adapters import parameter_count, read_adapter  # jax: only when this summary runs

    adapter_file = workdir / "lora" / "adapter.safetensors"
    adapter_config, weights, _ = read_adapter(adapter_file)
    trained, values = parameter_count(weights)
    adapter = {"file": str(adapter_file), "bytes": adapter_file.stat().st_size, "stored_values": values,
               "trained_values": trained, "config": dataclasses.asdict(adapter_config)}
    summary["adapter"] = adapter
    summary["evaluation"] = json.loads((workdir / "lora_evaluation" / "report.json").read_text())
    atomic_write_json(workdir / "lora_summary.json", summary)
    metrics = (f"{instrument}_recall", f"{instrument}_acc", f"attr_recall_{instrument}", "tempo_acc", "key_acc",
               "fd_embedded", "kl_embedded")
    lines = ["# musicdiff LoRA story", "",
             f"Total {summary['total_seconds'] / 60:.1f} min: " + ", ".join(
                 f"{name} {seconds:.0f} s" for name, seconds in summary["seconds"].items()), "",
             f"A DiT trained like the demo's on clips without {instrument} (step 0 below), then a "
             f"{adapter_config.kind} adapter of rank {adapter_config.rank} on the "
             f"demo's clips with {instrument} ({values:,} values, {adapter['bytes'] / 1024:.0f} KiB: {adapter_file}).",
             f"- Generated audio: {workdir / 'lora_evaluation' / 'generations'}/step_*/",
             f"- {instrument}_recall: the share of generations for prompts naming {instrument} in which the estimator "
             f"hears them (musicdiff/eval/prompt_following.py); {instrument}_acc: heard exactly where prompted, over "
             f"every prompt; attr_recall_{instrument}: the embedded evaluator's view of the same."]
    lines += evaluation_lines(summary["evaluation"], metrics)
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(workdir / "lora_summary.md", markdown)
    print("\n" + markdown)
    return summary

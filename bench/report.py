"""Turns measured rows into bench/results/<host>-<date>.json and a markdown table (ratio = musicdiff / reference).

    python -m bench.report RESULTS.json [--conditions="..."]

re-renders a results file's markdown with the current bench/analysis.py texts (and a note on the run's conditions),
leaving every measured number as it is.
"""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path
from typing import Any

from musicdiff.files import atomic_write_bytes, atomic_write_json

# The "Done when" ratios (musicdiff throughput / reference throughput).
TARGETS = {"ae_encode": 2.0, "ae_decode": 2.0, "dit_train_sao_small": 1.5, "sample_sao_small_pingpong": 1.5,
           "sample_sao_small_pingpong_native": 1.5, "sample_sao_dpmpp3msde": 1.1}

ACCELERATOR_NOTE = ("Accelerator mode (`make bench-gpu`: :sao DiT training step in bf16 with MFU, 47 s generation "
                    "at 100 and 8 steps, autoencoder decode, SA3 small 30 s generation beside its published H200 "
                    "numbers) was NOT run: no GPU/TPU was available for this run.")


def _rate(units: float, seconds: float) -> float:
    return units / seconds if seconds > 0 else 0.0


def summarize_row(row, measured: dict[str, Any], peak: float) -> dict[str, Any]:
    """Throughputs, ratio, efficiencies and (sampling rows) per-step and extrapolated latencies of one row."""
    out: dict[str, Any] = dict(name=row.name, title=row.title, unit=row.unit, units_per_run=row.units_per_run,
                               shapes=row.shapes, notes=row.notes, flops_per_run=row.flops_per_run)
    if "error" in measured:
        out["error"] = measured["error"]
        return out
    out.update(measured)
    sides = {}
    for side in ("musicdiff", "reference"):
        median = measured[side]["median_seconds"]
        summary = {"per_second": _rate(row.units_per_run, median)}
        if row.flops_per_run:
            summary["flops_per_second"] = row.flops_per_run / median
            summary["efficiency"] = summary["flops_per_second"] / peak
        elif row.efficiency_basis == "decode_ceiling":
            summary["efficiency"] = summary["per_second"] / measured["decode_ceiling_clips_per_second"]
        if row.extrapolate_steps:
            summary["seconds_per_step"] = median / row.units_per_run
            summary["extrapolated_latency_seconds"] = summary["seconds_per_step"] * row.extrapolate_steps
        sides[side] = summary
        out[side].update(summary)
    out["ratio"] = sides["musicdiff"]["per_second"] / sides["reference"]["per_second"]
    out["efficiency_basis"] = ("analytic FLOPs / measured fp32 matmul peak" if row.flops_per_run else
                               "clips/s / crop-decode-only clips/s with the same threads")
    if row.name in TARGETS:
        out["target_ratio"] = TARGETS[row.name]
        out["meets_target"] = out["ratio"] >= TARGETS[row.name]
    return out


def _fmt_rate(summary: dict, unit: str) -> str:
    if "extrapolated_latency_seconds" in summary:
        return f"{summary['seconds_per_step']:.2f} s/step ({summary['extrapolated_latency_seconds']:.0f} s total)"
    return f"{summary['per_second']:.3g} {unit}/s"


def markdown_table(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [f"# musicdiff vs stable-audio-tools 0.0.19 — {machine['host']}, {report['date'][:10]}", "",
             f"CPU: {machine['cpu']}, {machine['cores_used']} cores used by each side (fp32 on both sides); "
             f"jax {machine['jax']}, torch {machine['reference']['torch']}. Peak fp32 matmul measured in this run: "
             f"{report['peak_flops_per_second'] / 1e9:.1f} GFLOP/s (max of jnp and torch, before and after the rows). "
             f"Medians of {report['repeats']} alternating runs per side after warm-up; load average over the run "
             f"{report['load_average_range'][0]:.1f}–{report['load_average_range'][1]:.1f} (shared machine)."
             + (" **Quick mode: small shapes, not a result.**" if report["quick"] else ""), "",
             "Both sides alternate run by run on the same cores, but load from other work does not fall on them "
             "equally: it slows the reference's eager per-op thread-pool regions more than our compiled programs "
             "(on 2026-12-01 a run under load 3.6-5.8 read 1.4-9x the quiet runs' ratios on the DiT training and "
             "ping-pong rows), so only runs on a quiet machine are results."
             + (f" Conditions of this run: {report['conditions']}" if report.get("conditions") else ""), "",
             "| row | musicdiff | reference | ratio (musicdiff/ref) | target | efficiency musicdiff / ref | "
             "compile (musicdiff) |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['title']} | failed: {row['error'].splitlines()[0][:80]} | | | | | |")
            continue
        ours, ref = row["musicdiff"], row["reference"]
        target = f"≥{row['target_ratio']:.1f}× {'✓' if row['meets_target'] else '✗'}" if "target_ratio" in row else ""
        lines.append(f"| {row['title']} | {_fmt_rate(ours, row['unit'])} | {_fmt_rate(ref, row['unit'])} | "
                     f"{row['ratio']:.2f}× | {target} | {ours['efficiency']:.1%} / {ref['efficiency']:.1%} | "
                     f"{ours['compile_seconds']:.1f} s |")
    lines += ["", "Efficiency: analytic FLOPs per second over the measured peak (the pipeline row: clips/s over the "
              "crop-decode-only ceiling with the same threads). Sampling rows measure a few steps of the same "
              "sampler and extrapolate the per-step time to the full step count (see each row's notes).", "",
              "## Rows", ""]
    for row in report["rows"]:
        lines.append(f"- **{row['title']}** (`{row['name']}`): {row['notes']}. Shapes: "
                     + ", ".join(f"{k}={v}" for k, v in row["shapes"].items()) + ".")
        if row.get("analysis"):
            lines.append(f"  Analysis: {row['analysis']}")
    lines += ["", "## Accelerator mode", "", report["accelerator"], ""]
    return "\n".join(lines) + "\n"


def apply_analysis(rows: list[dict[str, Any]], analysis: dict[str, str]) -> None:
    for row in rows:
        if row["name"] in analysis:
            row["analysis"] = analysis[row["name"]]
        else:
            row.pop("analysis", None)


def rerender(json_path: Path, conditions: str | None = None, analysis: dict[str, str] | None = None) -> Path:
    """Rewrites a results file's analysis texts (and conditions, when given) and its markdown next to it."""
    from bench.analysis import ROW_ANALYSIS

    report = json.loads(Path(json_path).read_text())
    apply_analysis(report["rows"], ROW_ANALYSIS if analysis is None else analysis)
    if conditions is not None:
        report["conditions"] = conditions
    md_path = Path(json_path).with_suffix(".md")
    atomic_write_json(Path(json_path), report)
    atomic_write_bytes(md_path, markdown_table(report).encode())
    return md_path


def write_report(report: dict[str, Any], measured: list, out_dir: Path,
                 analysis: dict[str, str] | None = None) -> tuple[Path, Path]:
    from bench.analysis import ROW_ANALYSIS

    analysis = ROW_ANALYSIS if analysis is None else analysis
    peak = max(max(p.values()) for p in report["peak_measurements"])
    report["peak_flops_per_second"] = peak
    rows = [summarize_row(row, result, peak) for row, result in measured]
    apply_analysis(rows, analysis)
    report["rows"] = rows
    loads = [v for r in rows if "load_average" in r for v in (r["load_average"]["before"][0],
                                                               r["load_average"]["after"][0])]
    report["load_average_range"] = [min(loads), max(loads)] if loads else [0.0, 0.0]
    report["accelerator"] = ACCELERATOR_NOTE
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"{socket.gethostname()}-{datetime.date.today().isoformat()}" + ("-quick" if report["quick"] else "")
            + ("-rows" if report.get("rows_selected") else ""))
    json_path, run = out_dir / f"{stem}.json", 1
    while json_path.exists():  # another run of the same day: keep it
        run += 1
        json_path = out_dir / f"{stem}-{run}.json"
    md_path = json_path.with_suffix(".md")
    atomic_write_json(json_path, report)
    atomic_write_bytes(md_path, markdown_table(report).encode())
    return json_path, md_path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="re-render a bench results file's markdown")
    parser.add_argument("results_json", type=Path)
    parser.add_argument("--conditions", default=None, help="a note on the machine's conditions during the run")
    args = parser.parse_args()
    print(rerender(args.results_json, args.conditions))

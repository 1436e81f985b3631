"""Reconstruction reports: aggregating per-clip metrics (musicdiff.audio.metrics) and the shared report writer.

The metric definitions and their assumed settings are in musicdiff.audio.metrics; ASSUMPTIONS states them in reports.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from musicdiff.files import atomic_write_text

ASSUMPTIONS = (
    "STFT distance: auraloss STFTLoss defaults (fft 1024, hop 256, Hann 1024, SC + log-magnitude L1), per channel.",
    "MEL distance: the same with a 128-band librosa mel filterbank.",
    "SI-SDR: zero-mean, eps 1e-8, per channel then averaged; identical signals are capped by eps, not +inf.",
    "MR-STFT distance: the training resolutions (2048..32, hop fft/4) without A-weighting.",
)


def aggregate(per_clip: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std, count}} over clips; std is the population std (ddof 0). Non-finite values are refused."""
    if not per_clip:
        raise ValueError("aggregate: no clips to aggregate")
    names = list(dict.fromkeys(name for clip in per_clip for name in clip))
    summary = {}
    for name in names:
        values = np.array([clip[name] for clip in per_clip if name in clip], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"aggregate: metric '{name}' has {int(np.sum(~np.isfinite(values)))} non-finite values")
        summary[name] = dict(mean=float(values.mean()), std=float(values.std()), count=int(values.size))
    return summary


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def write_report(
    metrics: Mapping[str, Any], workdir: str | os.PathLike, title: str, *, notes: Sequence[str] = (),
    fields: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes `report.json` and a readable `report.md` table into `workdir`, each atomically.

    `metrics` maps a metric name to a number or to a dict of numbers (such as `aggregate`'s mean/std/count); the
    table's columns are the union of those keys. `fields` are further top-level JSON entries (such as the checkpoint
    step). Returns (json_path, markdown_path).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = dict(title=title, created=created, **dict(fields or {}), metrics=dict(metrics), notes=list(notes))
    json_path, md_path = workdir / "report.json", workdir / "report.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2, default=float) + "\n")

    columns = list(dict.fromkeys(k for v in metrics.values() if isinstance(v, Mapping) for k in v))
    if any(not isinstance(v, Mapping) for v in metrics.values()):
        columns = ["value"] + columns
    lines = [f"# {title}", "", f"Generated {created}.", "", "| metric | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, value in metrics.items():
        row = value if isinstance(value, Mapping) else {"value": value}
        lines.append(f"| {_cell(name)} | " + " | ".join(_cell(row[c]) if c in row else "" for c in columns) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path

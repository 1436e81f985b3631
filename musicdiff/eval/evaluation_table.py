"""One table of evaluated clip sets, reference rows beside checkpoint steps, that says whether training helped.

A metric of a checkpoint means little alone: it needs a ceiling and a floor measured the same way. Reference rows
are named clip sets evaluated exactly like generations (same backbones, reference statistics, crop length and
bootstrap):
- "real": held-out real clips as a generation set, their captions and attributes as prompts (the ceiling);
  `write_real_row` lists the reference folder's clips as such a set (`config.real_row`);
- "autoencoded": real clips passed through the autoencoder (what the latent space can reach; the caller writes
  the folder, e.g. with generation_sets.write_index);
- "step_0": generations of the untrained model (the floor).
Any other name works; `config.reference_rows` ("name=DIR,name=DIR") names rows from the command line.

Outputs in WORKDIR: rows/<name>/report.* per reference row, step_<step>/report.* per checkpoint step,
series.json ({step: {metric: value}}, as before), report.json / report.md (the table: rows = sets, columns =
metrics as value [lo, hi], then one verdict per metric), series.png (musicdiff.eval.generation_sets.plot_series)
and TensorBoard scalars per step.

Verdict per metric: the last checkpoint step against the floor (the row "step_0" when given, else the first
checkpoint step); "improved" or "worse" only when the two intervals separate, in the metric's direction
(musicdiff.eval.intervals).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from musicdiff.errors import ConfigError, DataError
from musicdiff.eval import generation_sets
from musicdiff.eval.generation_eval import GenerationEvaluator
from musicdiff.eval.intervals import compare, is_higher_better
from musicdiff.files import atomic_write_bytes, atomic_write_json

REAL_ROW = "real"
FLOOR_ROW = "step_0"
ROWS_DIR = "rows"
_ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a row's name is also its folder under WORKDIR/rows


@dataclasses.dataclass
class EvaluatedRow:
    name: str  # a reference row's name, or "step <step>"
    folder: str  # the clip set evaluated
    clips: int
    metrics: dict[str, dict[str, float]]  # metric -> {value, lo, hi}
    step: int | None = None  # the checkpoint step; None for a reference row


@dataclasses.dataclass
class EvaluationTable:
    rows: list[EvaluatedRow]
    crop_seconds: float  # 0: whole clips
    bootstrap: dict[str, Any]

    @property
    def reference_rows(self) -> list[EvaluatedRow]:
        return [row for row in self.rows if row.step is None]

    @property
    def step_rows(self) -> list[EvaluatedRow]:
        return sorted((row for row in self.rows if row.step is not None), key=lambda row: row.step)

    def step_values(self) -> dict[int, dict[str, float]]:
        """{step: {metric: value}} (the series.json of earlier versions)."""
        return {row.step: {name: m["value"] for name, m in row.metrics.items()} for row in self.step_rows}

    def metric_names(self) -> list[str]:
        return list(dict.fromkeys(name for row in self.rows for name in row.metrics))

    def verdicts(self) -> dict[str, dict[str, Any]]:
        """Per metric: the last step against the floor (module docstring); {} without both."""
        floors = [row for row in self.reference_rows if row.name == FLOOR_ROW] or self.step_rows[:1]
        if not floors or not self.step_rows or self.step_rows[-1] is floors[0]:
            return {}
        floor, last = floors[0], self.step_rows[-1]
        out = {}
        for name in self.metric_names():
            if name in floor.metrics and name in last.metrics:
                before, after = floor.metrics[name], last.metrics[name]
                out[name] = dict(baseline=floor.name, candidate=last.name, higher_is_better=is_higher_better(name),
                                 verdict=compare(name, (before["lo"], before["hi"]), (after["lo"], after["hi"])))
        return out

    def to_json(self) -> dict[str, Any]:
        return dict(title="Evaluation table", crop_seconds=self.crop_seconds, bootstrap=self.bootstrap,
                    rows=[dataclasses.asdict(row) for row in self.rows], verdicts=self.verdicts())

    def markdown(self) -> str:
        names = self.metric_names()
        lines = ["# Evaluation table", "",
                 "| set | clips | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for row in [*self.reference_rows, *self.step_rows]:
            cells = [_interval_cell(row.metrics.get(name)) for name in names]
            label = row.name if row.step is not None else f"{row.name} (reference)"
            lines.append(f"| {label} | {row.clips} | " + " | ".join(cells) + " |")
        verdicts = self.verdicts()
        if verdicts:
            lines += ["", "Verdicts (only separated intervals count as a change):", ""]
            for name, verdict in verdicts.items():
                direction = "higher" if verdict["higher_is_better"] else "lower"
                lines.append(f"- {name} ({direction} is better): {verdict['candidate']} vs {verdict['baseline']}: "
                             f"{verdict['verdict']}")
        cropped = f"cropped to their first {self.crop_seconds:.4g} s" if self.crop_seconds > 0 else "whole"
        lines += ["", f"Every set and the reference analysed {cropped}; cells are value [lo, hi], the "
                      f"{self.bootstrap['level']:.0%} percentile-bootstrap interval over clips "
                      f"({self.bootstrap['resamples']} resamples, FD {self.bootstrap['fd_resamples']})."]
        return "\n".join(lines) + "\n"


def _interval_cell(entry: Mapping[str, float] | None) -> str:
    if entry is None:
        return ""
    return f"{entry['value']:.4g} [{entry['lo']:.4g}, {entry['hi']:.4g}]"


def _numeric_points(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    points = {}
    for name, entry in metrics.items():
        point = generation_sets.metric_point(entry)
        if point is not None:
            points[name] = dict(zip(("value", "lo", "hi"), point))
    return points


def write_real_row(config: Any, folder: str | Path) -> Path:
    """Lists real clips as a generation set in `folder`, the "real" row: the first `num_prompts` clips of
    `config.prompts_dir` (the clips the series' prompts came from) when set, else the reference clips."""
    ref = config.reference
    clips = generation_sets.heldout_prompt_clips(config)
    if clips is None:
        if not str(ref.audio_dir):
            raise ConfigError("config.real_row needs real clips: set --config.prompts_dir=DIR (held-out clips) or "
                              "--config.reference.audio_dir=DIR")
        clips = generation_sets.read_reference(ref.audio_dir, str(ref.pair_by), int(ref.max_clips))
    generation_sets.write_index(folder, clips)
    return Path(folder)


def reference_rows_from_config(config: Any, workdir: str | Path) -> dict[str, Path]:
    """The rows `config.real_row` (the reference clips, listed into WORKDIR/rows/real) and `config.reference_rows`
    ("name=DIR,name=DIR") name."""
    rows: dict[str, Path] = {}
    if bool(config.get("real_row", False)):
        rows[REAL_ROW] = write_real_row(config, Path(workdir) / ROWS_DIR / REAL_ROW)
    for item in filter(None, (part.strip() for part in str(config.get("reference_rows", "")).split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not folder.strip():
            raise ConfigError(f"config.reference_rows: '{item}' is not name=DIR; e.g. "
                              f"--config.reference_rows=autoencoded=/runs/ae_clips,step_0=/runs/gen0")
        rows[name.strip()] = Path(folder.strip())
    return rows


def evaluate_table(config: Any, workdir: str | Path, folders: Mapping[int, str | Path],
                   reference_rows: Mapping[str, str | Path] | None = None) -> EvaluationTable:
    """Evaluates checkpoint `folders` ({step: generations folder}) and `reference_rows` ({name: folder}; None: from
    the config, see reference_rows_from_config) at one crop length and writes the outputs (module docstring)."""
    from musicdiff.metrics import MetricLogger

    workdir = Path(workdir)
    rows = dict(reference_rows_from_config(config, workdir) if reference_rows is None else reference_rows)
    for name in rows:
        if not _ROW_NAME.fullmatch(name):
            raise ConfigError(f"reference row '{name}': use letters, digits, '_', '.', '-' (it names a folder)")
    if not rows and not folders:
        raise DataError("nothing to evaluate: no checkpoint folder and no reference row")
    pair_by = str(config.reference.pair_by)
    evaluator = GenerationEvaluator(config, workdir)
    try:
        sets = [generation_sets.read_generations(f, pair_by) for f in [*rows.values(), *folders.values()]]
        crop = evaluator.crop_seconds_for(sets)
        evaluated = []
        for name, folder in rows.items():
            result = evaluator.evaluate(folder, workdir / ROWS_DIR / name, step=0, crop_seconds=crop, set_name=name)
            evaluated.append(EvaluatedRow(name, str(folder), result["clips"], _numeric_points(result["metrics"])))
        for step, folder in sorted(folders.items()):
            result = evaluator.evaluate(folder, workdir / f"step_{step}", step=step, crop_seconds=crop)
            evaluated.append(EvaluatedRow(f"step {step}", str(folder), result["clips"],
                                          _numeric_points(result["metrics"]), step))
        bootstrap = dict(resamples=evaluator.resamples, fd_resamples=evaluator.fd_resamples, level=evaluator.level,
                         seed=evaluator.seed)
    finally:
        evaluator.close()
    table = EvaluationTable(evaluated, crop, bootstrap)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(workdir / "series.json", {str(k): v for k, v in table.step_values().items()})
    atomic_write_json(workdir / "report.json", table.to_json())
    atomic_write_bytes(workdir / "report.md", table.markdown().encode())
    with MetricLogger(workdir, progress=False) as logger:
        for step, values in table.step_values().items():
            logger.write_scalars(step, {f"eval/{name}": value for name, value in values.items()})
    generation_sets.plot_series({row.step: row.metrics for row in table.step_rows}, workdir / "series.png",
                                title="evaluation vs checkpoint step",
                                reference_rows={row.name: row.metrics for row in table.reference_rows})
    return table


def evaluate_reference_rows(config: Any, workdir: str | Path, rows: Mapping[str, str | Path],
                            steps: Mapping[int, str | Path] | None = None) -> EvaluationTable:
    """Evaluates named clip sets `rows` ({name: generations folder}: "real", "autoencoded", "step_0", ...) beside
    the checkpoint `steps`, all with one crop length and the same intervals; see evaluate_table."""
    return evaluate_table(config, workdir, dict(steps or {}), rows)

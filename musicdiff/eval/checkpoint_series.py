"""Evaluating every saved step of a diffusion training run: generate from each checkpoint, evaluate, plot.

`evaluate_checkpoints(config, workdir)` (launch.evaluate with `--config.checkpoints=RUN`):
1. the prompts are `config.prompts_file` or, when empty, the first `config.num_prompts` captions (with their
   attributes) of the reference audio folder, written to WORKDIR/prompts.jsonl, so KL pairs every generation with
   its reference clip and prompt following has targets;
2. for each saved step of RUN/checkpoints, launch.generate's stage runs with the settings of `config.generate`
   (configs/generate.py) into WORKDIR/generations/step_<step>/ (skipped when that folder is complete, so a rerun
   resumes);
3. musicdiff.eval.generation_eval.evaluate_series evaluates the folders, beside the reference rows that
   `config.real_row` / `config.reference_rows` name, all at one crop length with bootstrap intervals:
   WORKDIR/step_<step>/report.*, WORKDIR/rows/<name>/report.*, WORKDIR/series.json, the table
   WORKDIR/report.{json,md} and WORKDIR/series.png (musicdiff.eval.evaluation_table).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from musicdiff.errors import ConfigError, DataError
from musicdiff.eval import generation_sets
from musicdiff.eval.generation_eval import evaluate_series
from musicdiff.files import atomic_write_bytes

log = logging.getLogger(__name__)
GenerateFn = Callable[[ml_collections.ConfigDict, Path], Any]


def saved_steps(run: str | Path) -> dict[int, Path]:
    """{step: step directory} of a training workdir (or its checkpoints/ directory); finished steps only."""
    import orbax.checkpoint as ocp
    from etils import epath

    from musicdiff.checkpoints import CHECKPOINT_DIR

    path = Path(run)
    if (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    if not path.is_dir():
        raise ConfigError(f"config.checkpoints={run}: no such training workdir or checkpoints directory")
    steps = sorted(ocp.step.checkpoint_steps(epath.Path(path)))
    if not steps:
        raise ConfigError(f"config.checkpoints={run}: holds no saved checkpoint step")
    return {int(step): path / str(step) for step in steps}


def prompts_from_reference(audio_dir: str | Path, count: int, out: Path) -> Path:
    """Writes the first `count` reference captions (and attributes) as a launch.generate prompts .jsonl."""
    clips = generation_sets.read_reference(audio_dir, "prompt", count)
    lines = [json.dumps(dict(prompt=c.prompt, attributes=c.attributes) if c.attributes else dict(prompt=c.prompt))
             for c in clips]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out


def _default_generate(config: ml_collections.ConfigDict, workdir: Path) -> Any:
    from musicdiff.inference.batch_generation import generate_to_folder

    return generate_to_folder(config, workdir)


def evaluate_checkpoints(config: Any, workdir: Path, generate: GenerateFn | None = None) -> dict[int, dict[str, float]]:
    """Generate from every saved step of `config.checkpoints`, then evaluate the series (module docstring)."""
    workdir = Path(workdir)
    steps = saved_steps(str(config.checkpoints))
    prompts = str(config.get("prompts_file", ""))
    if not prompts:
        source = str(config.get("prompts_dir", "")) or str(config.reference.audio_dir)
        if not source:
            raise ConfigError("config.prompts_file is empty and there is no config.prompts_dir or "
                              "config.reference.audio_dir to take prompts from; pass --config.prompts_file=PROMPTS.jsonl")
        prompts = str(prompts_from_reference(source, int(config.num_prompts), workdir / "prompts.jsonl"))
    generate = generate or _default_generate
    folders = {}
    for step, step_dir in steps.items():
        folder = workdir / "generations" / f"step_{step}"
        if not (folder / generation_sets.GENERATIONS_NAME).is_file():
            settings = ml_collections.ConfigDict(json.loads(config.generate.to_json_best_effort()))
            settings.checkpoint = str(step_dir)
            settings.prompts_file = prompts
            settings.prompt = ""
            log.info("generating from step %d into %s", step, folder)
            generate(settings, folder)
        if not (folder / generation_sets.GENERATIONS_NAME).is_file():
            raise DataError(f"generation from step {step} wrote no {generation_sets.GENERATIONS_NAME} in {folder}")
        folders[step] = folder
    return evaluate_series(config, workdir, folders)

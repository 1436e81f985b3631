"""The offline evaluation stage behind launch.evaluate: `config.kind` picks what is scored (configs/evaluate.py).

- generation / embedded: generated audio against a reference set (musicdiff.eval.generation_eval): one folder
  (`generated_dir`), a series of folders (`series_dir`) or every saved step of a run (`checkpoints`, generating
  first: musicdiff.eval.checkpoint_series). Writes OUT/report.json, OUT/report.md and TensorBoard scalars (series:
  per step, plus OUT/series.json and OUT/series.png) and prints the report.
- autoencoder: reconstruction scores of an autoencoder checkpoint on held-out clips
  (musicdiff.eval.autoencoder_eval). Writes OUT/report.json, OUT/report.md, OUT/per_clip.json and prints the report.
- inpainting: span inpainting of held-out clips by each method on one model (musicdiff.eval.inpainting_eval): the
  kept region against the autoencoder's own reconstruction, and the seams.

Each kind imports its own modules when chosen, so scoring an autoencoder loads no generation backbones.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from musicdiff.errors import ConfigError


def evaluate_generated(config: ml_collections.ConfigDict, workdir: Path):
    from musicdiff.eval.checkpoint_series import evaluate_checkpoints
    from musicdiff.eval.generation_eval import evaluate_generations, evaluate_series
    from musicdiff.eval.generation_sets import series_folders

    if str(config.checkpoints):
        series = evaluate_checkpoints(config, workdir)
    elif str(config.series_dir):
        series = evaluate_series(config, workdir, series_folders(config.series_dir))
    else:
        result = evaluate_generations(config, workdir)
        print((Path(workdir) / "report.md").read_text())
        return result
    print(json.dumps({str(step): values for step, values in series.items()}, indent=2))
    print(f"wrote {Path(workdir) / 'series.png'} and {Path(workdir) / 'series.json'}")
    return series


def evaluate_reconstruction(config: ml_collections.ConfigDict, workdir: Path):
    from musicdiff.eval.autoencoder_eval import evaluate_autoencoder

    result = evaluate_autoencoder(config, workdir)
    print((Path(workdir) / "report.md").read_text())
    return result


def evaluate_inpainted(config: ml_collections.ConfigDict, workdir: Path):
    from musicdiff.eval.inpainting_eval import evaluate_inpainting

    result = evaluate_inpainting(config, workdir)
    print((Path(workdir) / "report.md").read_text())
    return result


EVALUATIONS = {"generation": evaluate_generated, "embedded": evaluate_generated,
               "autoencoder": evaluate_reconstruction, "inpainting": evaluate_inpainted}


def evaluate(config: ml_collections.ConfigDict, workdir: Path):
    """Runs the evaluation `config.kind` names; its result (a report, or a series of reports by step)."""
    kind = config.get("kind", None)
    if kind not in EVALUATIONS:
        raise ConfigError(f"config.kind={kind!r}: choose one of {', '.join(EVALUATIONS)} (configs/evaluate.py presets)")
    return EVALUATIONS[kind](config, workdir)

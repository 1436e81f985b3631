"""Evaluating generated audio against a reference set: FD, KL, CLAP score, prompt following, inference time.

`evaluate_generations(config, workdir)` is the stage (configs/evaluate.py presets "generation" and "embedded");
`evaluate_series(config, workdir, folders)` evaluates several generation folders keyed by checkpoint step with
the same backbones and reference statistics, and plots every metric against the step.

Per metric a backbone is named in the config (`fd_backbone`, `kl_backbone`, `clap_backbone`; "" turns a metric
off) and built from `config.backbones.<name>` (musicdiff.eval.backbones). Each backbone analyses every clip once.
- FD: generated frames pooled vs the reference statistics (computed from `reference.audio_dir` and cached under
  `reference.cache_dir` by backbone id + file-list hash, or read from `reference.stats` `.npz` files, whose
  backbone id must match). Reported as `fd_<backbone>`.
- KL (SA direction, musicdiff.eval.scores): each generation's label distribution vs the reference distribution of
  its pairing id (the prompt = the reference caption, or the file stem); mean per prompt, then over prompts.
- CLAP score: cosine of each generation's joint audio embedding with its prompt's text embedding.
- Prompt following (embedded set prompts: attributes or "... at N BPM ... in X minor" text): librosa tempo/key
  estimates vs the prompt (musicdiff.eval.prompt_following); with the embedded evaluator also its attribute
  accuracy (key, mode, tempo bucket, instruments).
- Inference time: `wall_time` of generations.jsonl.
Outputs: WORKDIR/report.json, report.md, per_clip.jsonl, TensorBoard scalars (WORKDIR/tensorboard) and
metrics.jsonl at `config.step`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from musicdiff.errors import ConfigError, DataError
from musicdiff.eval import attribute_labels, generation_sets, prompt_following, scores
from musicdiff.eval.backbones import build_backbone
from musicdiff.eval.backbones.base import Backbone, ClipAnalysis
from musicdiff.eval.frechet import EmbeddingStats, cached_stats, pooled_stats, source_hash
from musicdiff.eval.reconstruction import write_report
from musicdiff.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)
METRIC_KEYS = ("fd_backbone", "kl_backbone", "clap_backbone")
_SHORT = {"embedded": "embedded", "openl3": "openl3", "passt": "passt", "clap": "clap"}


def _analyze_clips(backbone: Backbone, clips: Sequence[generation_sets.AudioClip],
                   chunk: int = 8) -> list[ClipAnalysis]:
    out: list[ClipAnalysis] = []
    for start in range(0, len(clips), chunk):  # bounded memory: a chunk of prepared audio at a time
        prepared = [backbone.prepare(*clip.load()) for clip in clips[start:start + chunk]]
        out.extend(backbone.analyze(prepared))
    return out


def _mean_probs(analyses: Sequence[ClipAnalysis], keys: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """group -> pairing id -> the mean distribution of that id's clips (reference side)."""
    grouped: dict[str, dict[str, list[np.ndarray]]] = {}
    for analysis, key in zip(analyses, keys, strict=True):
        for group, probs in analysis.label_probs.items():
            grouped.setdefault(group, {}).setdefault(key, []).append(probs)
    return {g: {k: np.mean(v, axis=0) for k, v in d.items()} for g, d in grouped.items()}


class GenerationEvaluator:
    """Holds the backbones and reference statistics of one config, so a series reuses them."""

    def __init__(self, config: Any, workdir: Path):
        self.config = config
        self.workdir = Path(workdir)
        names = {key: str(config.get(key, "")) for key in METRIC_KEYS}
        if not any(names.values()):
            raise ConfigError("config.fd_backbone, config.kl_backbone and config.clap_backbone are all empty: "
                              "nothing to compute; name a backbone for at least one metric")
        self.names = names
        self._backbones: dict[str, Backbone] = {}
        self._reference: dict[str, EmbeddingStats] = {}
        self._loaded_stats = self._read_stats_files()

    # ---- backbones and reference --------------------------------------------------------------------------

    def backbone(self, name: str) -> Backbone:
        if name not in self._backbones:
            self._backbones[name] = build_backbone(name, self.config.backbones)
        return self._backbones[name]

    def _read_stats_files(self) -> list[EmbeddingStats]:
        text = str(self.config.reference.get("stats", ""))
        return [EmbeddingStats.load(p.strip()) for p in text.split(",") if p.strip()]

    def reference_stats(self, name: str) -> EmbeddingStats:
        """The reference statistics for backbone `name`: a given .npz, the cache, or computed from audio."""
        if name in self._reference:
            return self._reference[name]
        backbone = self.backbone(name)
        given = [s for s in self._loaded_stats if s.backbone_id == backbone.id]
        if given:
            self._reference[name] = given[0]
            return given[0]
        ref = self.config.reference
        if not str(ref.audio_dir):
            found = ", ".join(sorted(s.backbone_id for s in self._loaded_stats)) or "none"
            raise ConfigError(f"no reference for backbone '{backbone.id}': set --config.reference.audio_dir=DIR, or "
                              f"pass a statistics file of this backbone as --config.reference.stats=FILE.npz "
                              f"(given files are of: {found})")
        pair_by = str(ref.pair_by)
        clips = generation_sets.read_reference(ref.audio_dir, pair_by, int(ref.max_clips))
        key = source_hash([c.path for c in clips], dict(backbone=backbone.describe(), pair_by=pair_by))
        cache_dir = str(ref.cache_dir) or str(self.workdir / "reference_stats")

        def compute() -> EmbeddingStats:
            log.info("computing reference statistics of %d clips with %s", len(clips), backbone.id)
            analyses = _analyze_clips(backbone, clips)
            stats = pooled_stats([a.frames for a in analyses], backbone.id, key)
            stats.label_probs = _mean_probs(analyses, [c.key for c in clips])
            return stats

        stats, cached = cached_stats(cache_dir, backbone.id, key, compute)
        log.info("reference statistics for %s: %s (%d frames)", backbone.id, "cached" if cached else "computed",
                 stats.count)
        self._reference[name] = stats
        return stats

    # ---- one folder -----------------------------------------------------------------------------------------

    def evaluate(self, generated_dir: str | Path, out_dir: str | Path, step: int | None = None) -> dict[str, Any]:
        """Every configured metric of one generations folder; writes the reports into `out_dir`."""
        out_dir = Path(out_dir)
        pair_by = str(self.config.reference.pair_by)
        clips = generation_sets.read_generations(generated_dir, pair_by)
        analyses = {name: _analyze_clips(self.backbone(name), clips)
                    for name in dict.fromkeys(n for n in self.names.values() if n)}
        metrics: dict[str, Any] = {}
        per_clip: list[dict[str, Any]] = [dict(path=str(c.path), prompt=c.prompt) for c in clips]
        if self.names["fd_backbone"]:
            metrics.update(self._fd(self.names["fd_backbone"], analyses[self.names["fd_backbone"]]))
        if self.names["kl_backbone"]:
            metrics.update(self._kl(self.names["kl_backbone"], analyses[self.names["kl_backbone"]], clips, per_clip))
        if self.names["clap_backbone"]:
            metrics.update(self._clap(self.names["clap_backbone"], analyses[self.names["clap_backbone"]], clips,
                                      per_clip))
        if bool(self.config.prompt_following):
            metrics.update(self._prompt_following(clips, analyses, per_clip))
        timing = generation_sets.inference_time(clips)
        if timing:
            metrics["inference_time"] = dict(value=timing.pop("seconds_per_clip"), **timing)
        step = self._step(step, clips)
        self._write(out_dir, metrics, per_clip, clips, step)
        return dict(step=step, metrics=metrics, clips=len(clips))

    def _fd(self, name: str, analyses: Sequence[ClipAnalysis]) -> dict[str, Any]:
        backbone = self.backbone(name)
        generated = pooled_stats([a.frames for a in analyses], backbone.id)
        reference = self.reference_stats(name)
        value = generated.distance_to(reference)
        return {f"fd_{_SHORT[name]}": dict(value=value, backbone=backbone.id, frames_generated=generated.count,
                                           frames_reference=reference.count, dim=generated.dim)}

    def _kl(self, name: str, analyses: Sequence[ClipAnalysis], clips: Sequence[generation_sets.AudioClip],
            per_clip: list[dict[str, Any]]) -> dict[str, Any]:
        backbone = self.backbone(name)
        if not backbone.has_labels:
            raise ConfigError(f"config.kl_backbone={name}: backbone '{backbone.id}' gives no label probabilities; "
                              f"use passt or embedded")
        reference = self.reference_stats(name).label_probs
        if not reference:
            raise DataError(f"the reference statistics of '{backbone.id}' hold no label probabilities; recompute them "
                            f"from a reference audio folder (config.reference.audio_dir)")
        per_prompt: dict[str, list[tuple[float, float]]] = {}
        for analysis, clip, row in zip(analyses, clips, per_clip, strict=True):
            groups = [g for g in analysis.label_probs if clip.key in reference.get(g, {})]
            if not groups:
                continue
            forward = sum(scores.kl_divergence(analysis.label_probs[g], reference[g][clip.key]) for g in groups)
            backward = sum(scores.kl_divergence(reference[g][clip.key], analysis.label_probs[g]) for g in groups)
            row[f"kl_{_SHORT[name]}"] = forward
            per_prompt.setdefault(clip.key, []).append((forward, backward))
        if not per_prompt:
            raise DataError(f"KL: no generation pairs with a reference clip (pairing by "
                            f"{self.config.reference.pair_by}); generate from the reference set's captions, or pair "
                            f"by file stem with --config.reference.pair_by=stem")
        forward = float(np.mean([np.mean([f for f, _ in v]) for v in per_prompt.values()]))
        backward = float(np.mean([np.mean([b for _, b in v]) for v in per_prompt.values()]))
        return {f"kl_{_SHORT[name]}": dict(value=forward, backbone=backbone.id, kl_ref_gen=backward,
                                           prompts=len(per_prompt), groups=",".join(backbone.label_groups))}

    def _clap(self, name: str, analyses: Sequence[ClipAnalysis], clips: Sequence[generation_sets.AudioClip],
              per_clip: list[dict[str, Any]]) -> dict[str, Any]:
        backbone = self.backbone(name)
        if not backbone.has_text:
            raise ConfigError(f"config.clap_backbone={name}: backbone '{backbone.id}' has no text tower; use clap "
                              f"or set --config.clap_backbone=''")
        prompts = [c.prompt for c in clips]
        text = backbone.embed_text(prompts)
        audio = np.stack([a.joint_embedding if a.joint_embedding is not None else a.frames.mean(axis=0)
                          for a in analyses])
        result = scores.clap_score(audio, text, prompts)
        for row, value in zip(per_clip, scores.cosine_similarity(audio, text)):
            row["clap_score"] = float(value)
        return {"clap_score": dict(value=result["clap_score"], backbone=backbone.id, prompts=result["count"])}

    def _prompt_following(self, clips: Sequence[generation_sets.AudioClip],
                          analyses: Mapping[str, Sequence[ClipAnalysis]],
                          per_clip: list[dict[str, Any]]) -> dict[str, Any]:
        estimates, attributes = [], []
        embedded = analyses.get("embedded")
        for index, clip in enumerate(clips):
            targets = prompt_following.prompt_targets(clip.prompt, clip.attributes)
            if not targets:
                continue
            audio, rate = clip.load()
            result = prompt_following.clip_prompt_following(audio, rate, targets)
            estimates.append(result)
            per_clip[index].update(result)
            if embedded is not None:
                model_config = self.backbone("embedded").model_config
                scored = attribute_labels.attribute_scores(embedded[index].predictions, targets, model_config)
                attributes.append(scored)
                per_clip[index].update(scored)
        out: dict[str, Any] = {}
        summary = prompt_following.summarize(estimates)
        for name in prompt_following.SCORE_NAMES:
            if name in summary:
                out[name] = dict(value=summary[name], backbone="librosa", clips=int(summary[f"{name}_count"]))
        if attributes:
            backbone_id = self.backbone("embedded").id
            for name, value in attribute_labels.summarize_attribute_scores(attributes).items():
                out[name] = dict(value=value, backbone=backbone_id, clips=len(attributes))
        return out

    def _step(self, step: int | None, clips: Sequence[generation_sets.AudioClip]) -> int:
        if step is not None and step >= 0:
            return int(step)
        configured = int(self.config.get("step", -1))
        if configured >= 0:
            return configured
        recorded = {c.record.get("checkpoint_step") for c in clips} - {None}
        return int(recorded.pop()) if len(recorded) == 1 else 0

    def _write(self, out_dir: Path, metrics: Mapping[str, Any], per_clip: Sequence[Mapping[str, Any]],
               clips: Sequence[generation_sets.AudioClip], step: int) -> None:
        from musicdiff.metrics import MetricLogger

        settings = generation_sets.generation_settings(clips)
        notes = [f"{len(clips)} generated clips from {clips[0].path.parent}; step {step}."]
        notes += [f"generation settings: {json.dumps(settings)}"] if settings else []
        used = [f"{key.split('_')[0]}={self.backbone(name).id}" for key, name in self.names.items() if name]
        notes += [f"backbones: {', '.join(used)}."]
        notes += ["FD pools every frame of every clip (stable-audio-metrics); with fewer frames than dimensions the "
                  "covariance is singular and FD is for regression tracking only.",
                  "KL is KL(p_gen || p_ref) per prompt (the Stable Audio direction); kl_ref_gen is the other "
                  "direction (AudioCraft). Numbers of different backbones are not comparable."]
        write_report(metrics, out_dir, "Generation evaluation", notes=notes)
        atomic_write_bytes(out_dir / "per_clip.jsonl",
                           "".join(json.dumps(row, default=float) + "\n" for row in per_clip).encode())
        scalars = {name: float(m["value"]) for name, m in metrics.items() if isinstance(m.get("value"), (int, float))}
        with MetricLogger(out_dir, progress=False) as logger:
            logger.write_scalars(step, {f"eval/{name}": value for name, value in scalars.items()})

    def close(self) -> None:
        for backbone in self._backbones.values():
            backbone.close()


def evaluate_generations(config: Any, workdir: Path) -> dict[str, Any]:
    """The evaluation stage on `config.generated_dir` (see the module docstring); returns {step, metrics, clips}."""
    if not str(config.generated_dir):
        raise ConfigError("config.generated_dir is empty: pass the folder launch.generate wrote (audio + "
                          "generations.jsonl) as --config.generated_dir=DIR")
    evaluator = GenerationEvaluator(config, workdir)
    try:
        return evaluator.evaluate(config.generated_dir, workdir)
    finally:
        evaluator.close()


def evaluate_series(config: Any, workdir: Path, folders: Mapping[int, str | Path]) -> dict[int, dict[str, float]]:
    """Evaluates each {step: generations folder} into WORKDIR/step_<step>/, then writes WORKDIR/series.json, the
    metric-vs-step plot WORKDIR/series.png and TensorBoard scalars per step in WORKDIR."""
    from musicdiff.metrics import MetricLogger

    workdir = Path(workdir)
    evaluator = GenerationEvaluator(config, workdir)
    series: dict[int, dict[str, float]] = {}
    try:
        for step, folder in sorted(folders.items()):
            result = evaluator.evaluate(folder, workdir / f"step_{step}", step=step)
            series[step] = {name: float(m["value"]) for name, m in result["metrics"].items()
                            if isinstance(m.get("value"), (int, float))}
    finally:
        evaluator.close()
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(workdir / "series.json", {str(k): v for k, v in series.items()})
    with MetricLogger(workdir, progress=False) as logger:
        for step, values in series.items():
            logger.write_scalars(step, {f"eval/{name}": value for name, value in values.items()})
    generation_sets.plot_series(series, workdir / "series.png", title="evaluation vs checkpoint step")
    return series

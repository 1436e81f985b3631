"""Evaluating generated audio against a reference set: FD, KL, CLAP score, prompt following, inference time.

`evaluate_generations(config, workdir)` is the stage (configs/evaluate.py presets "generation" and "embedded");
`evaluate_series(config, workdir, folders, reference_rows=...)` evaluates several generation folders keyed by
checkpoint step, plus named reference rows (real clips, autoencoded clips, untrained generations), with the same
backbones, reference statistics and crop length, into one table and a plot (musicdiff.eval.evaluation_table).

Equal lengths: every clip, generated and reference, is cropped to its first `crop_seconds` before any analysis
(`config.crop_seconds`: 0 = the shortest clip of the evaluated sets and the reference, > 0 = that length, which must
not exceed the shortest clip, < 0 = whole clips), because a backbone zero-pads a short clip into its window and
clips of different lengths give different statistics however good the model (real clips cut to 1.4 s score FD
95-99 against the same clips at 6 s). The reference statistics are computed at that length and cached under it.

Intervals: every metric carries a percentile-bootstrap interval over the clips (musicdiff.eval.intervals;
`config.bootstrap`: resamples, fd_resamples, level, seed): per-clip averaged metrics resample their per-clip values,
FD resamples the generated clips and recomputes the distance to the fixed reference statistics.

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
Outputs: WORKDIR/report.json (metrics: {name: {value, lo, hi, ...}}, crop_seconds, bootstrap), report.md,
per_clip.jsonl, TensorBoard scalars (WORKDIR/tensorboard) and metrics.jsonl at `config.step`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from musicdiff.errors import ConfigError, DataError
from musicdiff.eval import generation_sets, prompt_following, scores
from musicdiff.models import evaluator_labels
from musicdiff.eval.backbones import build_backbone
from musicdiff.eval.backbones.base import Backbone, ClipAnalysis
from musicdiff.eval.frechet import EmbeddingStats, FrechetToReference, cached_stats, pooled_stats, source_hash
from musicdiff.eval.intervals import bootstrap_interval, grouped_mean
from musicdiff.eval.reconstruction import write_report
from musicdiff.files import atomic_write_bytes

log = logging.getLogger(__name__)
METRIC_KEYS = ("fd_backbone", "kl_backbone", "clap_backbone")
_SHORT = {"embedded": "embedded", "openl3": "openl3", "passt": "passt", "clap": "clap"}
LENGTH_TOLERANCE_SECONDS = 1e-6  # a configured crop may exceed the shortest clip by rounding only


def _prepared(backbone: Backbone, clip: generation_sets.AudioClip) -> np.ndarray:
    audio = backbone.prepare(*clip.load())
    if clip.crop_seconds <= 0:
        return audio
    # resampling rounds each file's length at its own rate: fix the last sample so every clip has the same length
    length = int(round(clip.crop_seconds * backbone.sample_rate))
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return np.pad(audio, ((0, 0), (0, length - audio.shape[-1])))


def _analyze_clips(backbone: Backbone, clips: Sequence[generation_sets.AudioClip],
                   chunk: int = 8) -> list[ClipAnalysis]:
    out: list[ClipAnalysis] = []
    for start in range(0, len(clips), chunk):  # bounded memory: a chunk of prepared audio at a time
        out.extend(backbone.analyze([_prepared(backbone, clip) for clip in clips[start:start + chunk]]))
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
        settings = config.get("bootstrap") or {}
        self.resamples = int(settings.get("resamples", 1000))
        self.fd_resamples = int(settings.get("fd_resamples", self.resamples))
        self.level = float(settings.get("level", 0.95))
        self.seed = int(settings.get("seed", 0))
        self._backbones: dict[str, Backbone] = {}
        self._reference: dict[tuple[str, float], EmbeddingStats] = {}
        self._reference_clips: list[generation_sets.AudioClip] | None = None
        self._pairing: dict[tuple[str, float], dict[str, dict[str, np.ndarray]]] = {}
        self._loaded_stats = self._read_stats_files()

    # ---- backbones and reference --------------------------------------------------------------------------

    def backbone(self, name: str) -> Backbone:
        if name not in self._backbones:
            self._backbones[name] = build_backbone(name, self.config.backbones)
        return self._backbones[name]

    def _read_stats_files(self) -> list[EmbeddingStats]:
        text = str(self.config.reference.get("stats", ""))
        return [EmbeddingStats.load(p.strip()) for p in text.split(",") if p.strip()]

    def reference_clips(self) -> list[generation_sets.AudioClip]:
        """The reference audio folder's clips (uncropped); [] when the reference is given as statistics only."""
        ref = self.config.reference
        if self._reference_clips is None:
            self._reference_clips = (generation_sets.read_reference(ref.audio_dir, str(ref.pair_by),
                                                                    int(ref.max_clips)) if str(ref.audio_dir) else [])
        return self._reference_clips

    def pairing_probs(self, name: str, crop_seconds: float) -> dict[str, dict[str, np.ndarray]]:
        """Per label group and pairing id, the label distribution a generation's KL is taken against: of the clips
        its prompt came from (`config.prompts_dir`: held-out clips, whose captions are not in the reference), else
        of the reference clips with that caption."""
        clips = generation_sets.heldout_prompt_clips(self.config)
        if clips is None:
            return self.reference_stats(name, crop_seconds).label_probs
        if (name, crop_seconds) not in self._pairing:
            analyses = _analyze_clips(self.backbone(name), generation_sets.crop_clips(clips, crop_seconds))
            self._pairing[(name, crop_seconds)] = _mean_probs(analyses, [c.key for c in clips])
        return self._pairing[(name, crop_seconds)]

    def crop_seconds_for(self, clip_sets: Sequence[Sequence[generation_sets.AudioClip]]) -> float:
        """The one length (seconds; 0 = whole clips) that `clip_sets` and the reference are analysed at: the
        shortest of their clips, or `config.crop_seconds` when > 0 (refused if longer than the shortest)."""
        configured = float(self.config.get("crop_seconds", 0.0))
        if configured < 0:
            return 0.0
        durations = [(clip.seconds(), clip.path) for clips in [*clip_sets, self.reference_clips()] for clip in clips]
        if not durations:
            raise DataError("no clips to evaluate")
        shortest, path = min(durations)
        if configured == 0:
            return shortest
        if configured > shortest + LENGTH_TOLERANCE_SECONDS:
            raise ConfigError(f"config.crop_seconds={configured:g}: longer than the shortest clip ({shortest:.4g} s, "
                              f"{path}); generated and reference clips are all cropped to one length, so set "
                              f"--config.crop_seconds to at most {shortest:.4g}, or 0 for the shortest clip's length")
        return configured

    def reference_stats(self, name: str, crop_seconds: float = 0.0) -> EmbeddingStats:
        """The reference statistics for backbone `name` at clips cropped to `crop_seconds` (0: whole clips): a
        given .npz (which must record that crop), the cache, or computed from audio."""
        crop_seconds = float(crop_seconds)
        if (name, crop_seconds) in self._reference:
            return self._reference[(name, crop_seconds)]
        backbone = self.backbone(name)
        given = [s for s in self._loaded_stats if s.backbone_id == backbone.id]
        if given:
            if abs(given[0].crop_seconds - crop_seconds) > LENGTH_TOLERANCE_SECONDS:
                raise ConfigError(f"config.reference.stats: the '{backbone.id}' statistics were computed from clips "
                                  f"cropped to {given[0].crop_seconds:g} s (0: whole clips) but this evaluation "
                                  f"crops to {crop_seconds:g} s; set --config.crop_seconds={given[0].crop_seconds:g} "
                                  f"(-1 for whole clips) or compute them from --config.reference.audio_dir")
            self._reference[(name, crop_seconds)] = given[0]
            return given[0]
        ref = self.config.reference
        if not str(ref.audio_dir):
            found = ", ".join(sorted(s.backbone_id for s in self._loaded_stats)) or "none"
            raise ConfigError(f"no reference for backbone '{backbone.id}': set --config.reference.audio_dir=DIR, or "
                              f"pass a statistics file of this backbone as --config.reference.stats=FILE.npz "
                              f"(given files are of: {found})")
        pair_by = str(ref.pair_by)
        clips = generation_sets.crop_clips(self.reference_clips(), crop_seconds)
        key = source_hash([c.path for c in clips], dict(backbone=backbone.describe(), pair_by=pair_by,
                                                        crop_seconds=crop_seconds))
        cache_dir = str(ref.cache_dir) or str(self.workdir / "reference_stats")

        def compute() -> EmbeddingStats:
            log.info("computing reference statistics of %d clips with %s", len(clips), backbone.id)
            analyses = _analyze_clips(backbone, clips)
            stats = pooled_stats([a.frames for a in analyses], backbone.id, key)
            stats.label_probs = _mean_probs(analyses, [c.key for c in clips])
            stats.crop_seconds = crop_seconds
            return stats

        stats, cached = cached_stats(cache_dir, backbone.id, key, compute)
        log.info("reference statistics for %s: %s (%d frames)", backbone.id, "cached" if cached else "computed",
                 stats.count)
        self._reference[(name, crop_seconds)] = stats
        return stats

    # ---- one folder -----------------------------------------------------------------------------------------

    def evaluate(self, generated_dir: str | Path, out_dir: str | Path, step: int | None = None, *,
                 crop_seconds: float | None = None, set_name: str = "") -> dict[str, Any]:
        """Every configured metric of one generations folder, with intervals; writes the reports into `out_dir`.
        `crop_seconds`: the length to analyse (a series passes one for all its sets); None: `crop_seconds_for`
        this folder. `set_name` names a reference row in the report instead of its step.
        Returns {step, metrics, clips, crop_seconds}."""
        out_dir = Path(out_dir)
        pair_by = str(self.config.reference.pair_by)
        clips = generation_sets.read_generations(generated_dir, pair_by)
        crop = self.crop_seconds_for([clips]) if crop_seconds is None else float(crop_seconds)
        clips = generation_sets.crop_clips(clips, crop)
        analyses = {name: _analyze_clips(self.backbone(name), clips)
                    for name in dict.fromkeys(n for n in self.names.values() if n)}
        metrics: dict[str, Any] = {}
        per_clip: list[dict[str, Any]] = [dict(path=str(c.path), prompt=c.prompt) for c in clips]
        if self.names["fd_backbone"]:
            metrics.update(self._fd(self.names["fd_backbone"], analyses[self.names["fd_backbone"]], crop))
        if self.names["kl_backbone"]:
            metrics.update(self._kl(self.names["kl_backbone"], analyses[self.names["kl_backbone"]], clips, per_clip,
                                    crop))
        if self.names["clap_backbone"]:
            metrics.update(self._clap(self.names["clap_backbone"], analyses[self.names["clap_backbone"]], clips,
                                      per_clip))
        if bool(self.config.prompt_following):
            metrics.update(self._prompt_following(clips, analyses, per_clip))
        timing = generation_sets.inference_time(clips)
        if timing:
            walls = [float(c.record["wall_time"]) for c in clips if "wall_time" in c.record]
            metrics["inference_time"] = dict(value=timing.pop("seconds_per_clip"), **self._interval(walls), **timing)
        step = self._step(step, clips)
        self._write(out_dir, metrics, per_clip, clips, step, crop, set_name)
        return dict(step=step, metrics=metrics, clips=len(clips), crop_seconds=crop)

    def _interval(self, values_or_fn: Any, size: int | None = None, resamples: int | None = None) -> dict[str, float]:
        lo, hi = bootstrap_interval(values_or_fn, resamples or self.resamples, self.seed, self.level, size=size)
        return dict(lo=lo, hi=hi)

    def _fd(self, name: str, analyses: Sequence[ClipAnalysis], crop_seconds: float) -> dict[str, Any]:
        backbone = self.backbone(name)
        frame_sets = [np.asarray(a.frames, np.float64).reshape(-1, np.shape(a.frames)[-1]) for a in analyses]
        generated = pooled_stats(frame_sets, backbone.id)
        reference = self.reference_stats(name, crop_seconds)
        value = generated.distance_to(reference)
        # the bootstrap resamples whole clips: a resample weighs each clip's frames by how often it was drawn
        to_reference = FrechetToReference(np.concatenate(frame_sets), reference)
        owner = np.repeat(np.arange(len(frame_sets)), [len(f) for f in frame_sets])

        def resampled_fd(indices: np.ndarray) -> float:
            return to_reference.distance(np.bincount(indices, minlength=len(frame_sets))[owner])

        interval = self._interval(resampled_fd, size=len(frame_sets), resamples=self.fd_resamples)
        return {f"fd_{_SHORT[name]}": dict(value=value, **interval, backbone=backbone.id,
                                           frames_generated=generated.count, frames_reference=reference.count,
                                           dim=generated.dim)}

    def _kl(self, name: str, analyses: Sequence[ClipAnalysis], clips: Sequence[generation_sets.AudioClip],
            per_clip: list[dict[str, Any]], crop_seconds: float) -> dict[str, Any]:
        backbone = self.backbone(name)
        if not backbone.has_labels:
            raise ConfigError(f"config.kl_backbone={name}: backbone '{backbone.id}' gives no label probabilities; "
                              f"use passt or embedded")
        reference = self.pairing_probs(name, crop_seconds)
        if not reference:
            raise DataError(f"the reference statistics of '{backbone.id}' hold no label probabilities; recompute them "
                            f"from a reference audio folder (config.reference.audio_dir)")
        forwards, backwards, keys = [], [], []
        for analysis, clip, row in zip(analyses, clips, per_clip, strict=True):
            groups = [g for g in analysis.label_probs if clip.key in reference.get(g, {})]
            if not groups:
                continue
            forwards.append(sum(scores.kl_divergence(analysis.label_probs[g], reference[g][clip.key])
                                for g in groups))
            backwards.append(sum(scores.kl_divergence(reference[g][clip.key], analysis.label_probs[g])
                                 for g in groups))
            keys.append(clip.key)
            row[f"kl_{_SHORT[name]}"] = forwards[-1]
        if not keys:
            raise DataError(f"KL: no generation pairs with a reference clip (pairing by "
                            f"{self.config.reference.pair_by}); generate from the reference set's captions, or pair "
                            f"by file stem with --config.reference.pair_by=stem")
        # mean per prompt, then over prompts; the bootstrap resamples clips and recomputes both means
        forward, every_clip = grouped_mean(forwards, keys), np.arange(len(keys))
        return {f"kl_{_SHORT[name]}": dict(value=forward(every_clip), **self._interval(forward, size=len(keys)),
                                           backbone=backbone.id,
                                           kl_ref_gen=grouped_mean(backwards, keys)(every_clip),
                                           prompts=len(set(keys)), groups=",".join(backbone.label_groups))}

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
        cosines = scores.cosine_similarity(audio, text)
        for row, value in zip(per_clip, cosines):
            row["clap_score"] = float(value)
        interval = self._interval(grouped_mean(cosines, prompts), size=len(prompts))
        return {"clap_score": dict(value=result["clap_score"], **interval, backbone=backbone.id,
                                   prompts=result["count"])}

    def _prompt_following(self, clips: Sequence[generation_sets.AudioClip],
                          analyses: Mapping[str, Sequence[ClipAnalysis]],
                          per_clip: list[dict[str, Any]]) -> dict[str, Any]:
        estimates, attributes = [], []
        embedded = analyses.get("embedded")
        for index, clip in enumerate(clips):
            targets = evaluator_labels.prompt_targets(clip.prompt, clip.attributes)
            if not targets:
                continue
            audio, rate = clip.load()
            result = prompt_following.clip_prompt_following(audio, rate, targets)
            estimates.append(result)
            per_clip[index].update(result)
            if embedded is not None:
                model_config = self.backbone("embedded").model_config
                scored = evaluator_labels.attribute_scores(embedded[index].predictions, targets, model_config)
                attributes.append(scored)
                per_clip[index].update(scored)
        out: dict[str, Any] = {}
        summary = prompt_following.summarize(estimates)
        for name in prompt_following.SCORE_NAMES:
            if name in summary:
                interval = self._interval([e[name] for e in estimates if name in e])
                out[name] = dict(value=summary[name], **interval, backbone="librosa",
                                 clips=int(summary[f"{name}_count"]))
        if attributes:
            backbone_id = self.backbone("embedded").id
            for name, value in evaluator_labels.summarize_attribute_scores(attributes).items():
                out[name] = dict(value=value, **self._attribute_interval(name, attributes), backbone=backbone_id,
                                 clips=len(attributes))
        return out

    def _attribute_interval(self, name: str, attributes: Sequence[Mapping[str, float]]) -> dict[str, float]:
        if name != "attr_instrument_f1":
            return self._interval([a[name] for a in attributes if name in a])
        # micro F1 is not a mean over clips: recompute it from the resampled clips' counts
        counted = [a for a in attributes if "instrument_tp" in a]

        def resampled_f1(indices: np.ndarray) -> float:
            return evaluator_labels.summarize_attribute_scores([counted[i] for i in indices])[name]

        return self._interval(resampled_f1, size=len(counted))

    def _step(self, step: int | None, clips: Sequence[generation_sets.AudioClip]) -> int:
        if step is not None and step >= 0:
            return int(step)
        configured = int(self.config.get("step", -1))
        if configured >= 0:
            return configured
        recorded = {c.record.get("checkpoint_step") for c in clips} - {None}
        return int(recorded.pop()) if len(recorded) == 1 else 0

    def _write(self, out_dir: Path, metrics: Mapping[str, Any], per_clip: Sequence[Mapping[str, Any]],
               clips: Sequence[generation_sets.AudioClip], step: int, crop_seconds: float, set_name: str) -> None:
        from musicdiff.metrics import MetricLogger

        settings = generation_sets.generation_settings(clips)
        cropped = f"cropped to their first {crop_seconds:.4g} s" if crop_seconds > 0 else "whole (not cropped)"
        which = f"the set '{set_name}'" if set_name else f"step {step}"
        notes = [f"{len(clips)} generated clips from {clips[0].path.parent}; {which}.",
                 f"Generated and reference clips analysed {cropped}.",
                 f"lo, hi: {self.level:.0%} percentile-bootstrap interval over clips ({self.resamples} resamples, "
                 f"FD {self.fd_resamples}, seed {self.seed}); FD's interval is biased upwards and may exclude the "
                 f"value (a resample repeats clips)."]
        notes += [f"generation settings: {json.dumps(settings)}"] if settings else []
        used = [f"{key.split('_')[0]}={self.backbone(name).id}" for key, name in self.names.items() if name]
        notes += [f"backbones: {', '.join(used)}."]
        notes += ["FD pools every frame of every clip (stable-audio-metrics); with fewer frames than dimensions the "
                  "covariance is singular and FD is for regression tracking only.",
                  "KL is KL(p_gen || p_ref) per prompt (the Stable Audio direction); kl_ref_gen is the other "
                  "direction (AudioCraft). Numbers of different backbones are not comparable."]
        bootstrap = dict(resamples=self.resamples, fd_resamples=self.fd_resamples, level=self.level, seed=self.seed)
        write_report(metrics, out_dir, "Generation evaluation", notes=notes,
                     fields=dict(step=step, crop_seconds=crop_seconds, bootstrap=bootstrap))
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


def evaluate_series(config: Any, workdir: Path, folders: Mapping[int, str | Path], *,
                    reference_rows: Mapping[str, str | Path] | None = None) -> dict[int, dict[str, float]]:
    """Evaluates each {step: generations folder} into WORKDIR/step_<step>/ and each named reference row into
    WORKDIR/rows/<name>/ (None: the rows `config.reference_rows` / `config.real_row` name), all at one crop length;
    writes WORKDIR/series.json ({step: {metric: value}}), the table WORKDIR/report.{json,md}, the plot
    WORKDIR/series.png and TensorBoard scalars per step (musicdiff.eval.evaluation_table). Returns the
    series.json content."""
    from musicdiff.eval.evaluation_table import evaluate_table

    return evaluate_table(config, workdir, folders, reference_rows).step_values()

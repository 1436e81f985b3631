"""Span inpainting on held-out clips: how well each method keeps the given audio and joins the new part to it.

    python -m launch.evaluate --config=configs/evaluate.py:inpainting --config.checkpoint=RUN \
        --config.data.root=HELDOUT --workdir=OUT

For each clip of the folder (its first `num_clips`), the span [span[0], span[1]) of the window (fractions of it) is
regenerated from the clip's own caption; the rest is the clip's own latents. Each of `methods` runs on the same
model, clips and seeds: "trained_input" (the model's inpainting input; needs a model trained with it),
"trained_input_merge" (that input plus the RePaint merge after every step, as SA3's TensorRT port) and "repaint"
(the RePaint-style merge, any model). Scores, per clip, on the decoded audio against the original clip:
- kept_mel: log-mel distance (dB, mean |difference|) over the kept frames (those whose STFT window does not reach
  into the span), next to `autoencoder_mel`, the same
  distance of the autoencoder's own reconstruction (decode(encode(clip))): the floor any method can reach;
- seam_mel: at each span boundary, the mean |difference| between the output's log-mel frames just before and just
  after it (`seam_frames` each side), minus the same for the original clip at the same place: the jump the output
  adds where it joins; 0 = as smooth as the music itself.
Each metric gets a percentile-bootstrap 95% interval over clips; with repaint among the methods,
`seam_mel_difference` is trained_input's seam minus repaint's clip by clip, with its own interval (a paired
comparison), and `seam_mel_difference_trained_input_merge` the same for trained_input_merge. Writes
OUT/report.json, OUT/report.md, OUT/per_clip.jsonl and the outputs' audio under OUT/<method>/.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from musicdiff.audio.io import load_audio, write_audio
from musicdiff.audio.spectrogram import log_mel
from musicdiff.errors import ConfigError, DataError
from musicdiff.eval.intervals import bootstrap_interval, intervals_separate
from musicdiff.files import atomic_write_bytes, atomic_write_json, atomic_write_text

# method -> SamplerSettings.inpainting, and the generation method it must resolve to
METHODS = {"trained_input": "auto", "trained_input_merge": "trained_merge", "repaint": "repaint"}
HOP = 256  # log-mel hop (samples): ~16 ms at 16 kHz


N_FFT = 1024
FLOOR = 1e-5  # power floor (-50 dB): silence and near-silence compare equal


def _mel(audio: np.ndarray, rate: int) -> np.ndarray:
    """Log-mel power in absolute dB (not relative to each clip's maximum, so a louder output reads as louder)."""
    return log_mel(audio, rate, n_mels=64, n_fft=N_FFT, hop=HOP, floor=FLOOR)


def clip_scores(original: np.ndarray, output: np.ndarray, reconstruction: np.ndarray, rate: int,
                span: tuple[int, int], seam_frames: int) -> dict[str, float]:
    """kept_mel, autoencoder_mel and seam_mel of one clip ([channels, samples] each, equal lengths; span in samples)."""
    ref, out, rec = (_mel(a, rate) for a in (original, output, reconstruction))
    frames = ref.shape[1]
    start, end = (min(frames, int(round(s / HOP))) for s in span)
    centers = np.arange(frames) * HOP
    # Frames whose STFT window reaches into the span count as neither kept nor generated.
    kept = (centers + N_FFT // 2 <= span[0]) | (centers - N_FFT // 2 >= span[1])
    seams = []
    for boundary in (start, end):
        if seam_frames <= boundary <= frames - seam_frames:
            before, after = slice(boundary - seam_frames, boundary), slice(boundary, boundary + seam_frames)
            jump = np.mean(np.abs(out[:, before].mean(axis=1) - out[:, after].mean(axis=1)))
            natural = np.mean(np.abs(ref[:, before].mean(axis=1) - ref[:, after].mean(axis=1)))
            seams.append(float(jump - natural))
    return {"kept_mel": float(np.mean(np.abs(out[:, kept] - ref[:, kept]))),
            "autoencoder_mel": float(np.mean(np.abs(rec[:, kept] - ref[:, kept]))),
            "seam_mel": float(np.mean(seams)) if seams else float("nan")}


def evaluate_inpainting(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """The `inpainting` kind of launch.evaluate (module docstring); returns the report."""
    from data_pipelines.audio_folder import scan
    from musicdiff.inference.generate import Generator, SamplerSettings
    from musicdiff.inference.inpainting import REPAINT_FALLBACK, TRAINED_INPUT, TRAINED_MERGE

    workdir = Path(workdir)
    if not str(config.checkpoint):
        raise ConfigError("config.checkpoint is empty: pass the diffusion run to evaluate (--config.checkpoint=RUN)")
    methods = [m for m in str(config.methods).split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ConfigError(f"config.methods={config.methods!r}: choose from {', '.join(METHODS)} (comma-separated)")
    lo, hi = (float(x) for x in config.span)
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"config.span={tuple(config.span)}: need 0 <= start < end <= 1 (fractions of the window)")
    items = scan(config).items[: int(config.num_clips)]
    if not items:
        raise DataError(f"{config.data.root}: no usable clips to inpaint (launch.inspect_data says why clips are "
                        f"skipped, e.g. shorter than data.min_seconds)")
    generator = Generator.from_checkpoint(str(config.checkpoint))
    rate, ratio, frames = generator.sample_rate, generator.ratio, generator.latent_length
    channels = int(generator.autoencoder.config.in_channels)
    window = frames * ratio
    first, last = int(round(lo * frames)), int(round(hi * frames))
    regenerate = np.zeros(frames, np.float32)
    regenerate[first:last] = 1.0
    span_samples = (first * ratio, last * ratio)
    clips = [np.zeros((channels, window), np.float32) for _ in items]
    for clip, item in zip(clips, items):
        audio = load_audio(item.path, rate, channels, 0, window)
        clip[:, : audio.shape[1]] = audio
    known = generator.encode_audio(np.stack(clips))
    reconstructions = generator.decode(known)
    base = SamplerSettings.from_config(config.generate)
    per_clip: list[dict[str, Any]] = [{"path": str(item.path), "caption": item.caption} for item in items]
    for method in methods:
        settings = dataclasses.replace(base, inpainting=METHODS[method])
        expected = {"trained_input": TRAINED_INPUT, "trained_input_merge": TRAINED_MERGE}.get(method, REPAINT_FALLBACK)
        if generator.inpainting_method(settings) != expected:
            raise ConfigError(f"config.methods: '{method}' needs a model trained with the inpainting input "
                              f"(config.model.local_cond_dim > 0); {config.checkpoint} has none")
        for index, item in enumerate(items):
            latents = generator.sample_latents([item.caption], [frames * ratio / rate], settings,
                                               [int(config.seed) + index],
                                               inpaint=(known[index:index + 1], jnp.asarray(regenerate)[None, None]))
            output = generator.decode(latents)[0]
            write_audio(workdir / method / f"{index:03d}.wav", output, rate)
            scores = clip_scores(clips[index], output, reconstructions[index], rate, span_samples,
                                 int(config.seam_frames))
            per_clip[index].update({f"{method}/{name}": value for name, value in scores.items()})
    report = _report(per_clip, methods, config, span_samples, rate)
    atomic_write_json(workdir / "report.json", report)
    atomic_write_bytes(workdir / "per_clip.jsonl", "".join(json.dumps(r) + "\n" for r in per_clip).encode())
    atomic_write_text(workdir / "report.md", _markdown(report))
    return report


def _report(per_clip: list[dict[str, Any]], methods: list[str], config: ml_collections.ConfigDict,
            span: tuple[int, int], rate: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for method in methods:
        for name in ("kept_mel", "autoencoder_mel", "seam_mel"):
            values = np.asarray([row[f"{method}/{name}"] for row in per_clip], np.float64)
            values = values[np.isfinite(values)]
            low, high = bootstrap_interval(values, int(config.bootstrap.resamples), int(config.bootstrap.seed))
            metrics[f"{method}/{name}"] = dict(value=float(values.mean()), lo=low, hi=high, clips=int(values.size))
    verdicts = {}
    for trained in (m for m in methods if m != "repaint" and "repaint" in methods):
        # Suffix "" for trained_input (the names reports had before trained_input_merge existed).
        suffix = "" if trained == "trained_input" else f"_{trained}"
        a, b = metrics[f"{trained}/seam_mel"], metrics["repaint/seam_mel"]
        if not intervals_separate((a["lo"], a["hi"]), (b["lo"], b["hi"])):
            verdicts[f"seam_mel{suffix}"] = "no separable difference"
        else:
            verdicts[f"seam_mel{suffix}"] = f"{trained} smaller" if a["value"] < b["value"] else "repaint smaller"
        # Both methods inpaint the same clips, so the per-clip difference is the sharper comparison: most of each
        # method's spread is the clips' own (how much the music changes at the boundary), which the difference cancels.
        pairs = [(row[f"{trained}/seam_mel"], row["repaint/seam_mel"]) for row in per_clip]
        differences = np.asarray([x - y for x, y in pairs if np.isfinite(x) and np.isfinite(y)], np.float64)
        low, high = bootstrap_interval(differences, int(config.bootstrap.resamples), int(config.bootstrap.seed))
        metrics[f"seam_mel_difference{suffix}"] = dict(value=float(differences.mean()), lo=low, hi=high,
                                                       clips=int(differences.size))
        verdicts[f"seam_mel_difference{suffix}"] = (f"{trained} smaller" if high < 0 else "repaint smaller"
                                                    if low > 0 else "no separable difference")
    return {"checkpoint": str(config.checkpoint), "clips": len(per_clip), "span_seconds": [s / rate for s in span],
            "metrics": metrics, "verdicts": verdicts}


def _markdown(report: dict[str, Any]) -> str:
    span = report["span_seconds"]
    lines = [f"# Span inpainting: {report['clips']} clips, {span[0]:.2f}-{span[1]:.2f} s regenerated", "",
             "| metric | value [95% interval] |", "|---|---|"]
    for name, m in report["metrics"].items():
        lines.append(f"| {name} | {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] |")
    lines += ["", *(f"- {name}: {verdict}" for name, verdict in report["verdicts"].items()),
              "", "kept_mel: log-mel distance (dB) of the kept region to the original, beside the autoencoder's own "
              "reconstruction (autoencoder_mel); seam_mel: the jump at the span boundaries beyond the original's; "
              "seam_mel_difference(_<method>): that method's minus repaint's, clip by clip (paired)."]
    return "\n".join(lines) + "\n"


__all__ = ["clip_scores", "evaluate_inpainting"]

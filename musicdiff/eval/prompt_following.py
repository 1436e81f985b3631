"""Prompt following on the embedded set: tempo and key estimated from audio, scored against the prompted attributes.

Estimators (librosa, no weights):
- tempo: the onset-strength envelope (22.05 kHz mono, hop 512) and librosa's autocorrelation tempo estimate with its
  default log-normal prior around 120 BPM;
- key: the clip-mean CQT chromagram correlated (Pearson) with the 24 rotations of the Krumhansl-Kessler major and
  minor profiles; the best-correlated rotation is the key.

Scores (MIREX conventions):
- tempo_acc: |est - bpm| <= 4 % of bpm; tempo_acc_octave: also right at twice or half the tempo (octave errors);
- key_acc: tonic and mode both right; tonic_acc, mode_acc alone; key_mirex: the MIREX weighted key score
  (1 exact, 0.5 a fifth above or below in the same mode, 0.3 relative major/minor, 0.2 parallel major/minor, else 0).

Targets come from a generation's `attributes` (bpm, tonic_pitch_class or key, mode) or, when a prompt has none,
from its text ("... at 120 BPM", "... in E-flat minor"), which is how the embedded set's captions state them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from musicdiff.audio.io import resample
from musicdiff.models.evaluator_labels import MODES

ANALYSIS_RATE = 22050
HOP = 512
TEMPO_TOLERANCE = 0.04
OCTAVE_FACTORS = (1.0, 2.0, 0.5)
# Krumhansl & Kessler (1982) probe-tone profiles, tonic first.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def _mono(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    x = np.asarray(audio, np.float32)
    x = x[None] if x.ndim == 1 else x
    return resample(x.mean(axis=0, keepdims=True), int(sample_rate), ANALYSIS_RATE)[0]


def estimate_tempo(audio: np.ndarray, sample_rate: int) -> float:
    """Estimated tempo in BPM of [channels, samples] (or [samples]) audio."""
    import librosa

    y = _mono(audio, sample_rate)
    envelope = librosa.onset.onset_strength(y=y, sr=ANALYSIS_RATE, hop_length=HOP)
    return float(librosa.feature.tempo(onset_envelope=envelope, sr=ANALYSIS_RATE, hop_length=HOP)[0])


def key_scores(chroma: np.ndarray) -> np.ndarray:
    """[2, 12] Pearson correlations of a 12-d chroma vector with the rotated KK profiles ([mode, tonic])."""
    chroma = np.asarray(chroma, np.float64)
    out = np.zeros((2, 12))
    for m, profile in enumerate((KK_MAJOR, KK_MINOR)):
        for tonic in range(12):
            out[m, tonic] = np.corrcoef(chroma, np.roll(profile, tonic))[0, 1] if np.std(chroma) > 0 else 0.0
    return out


def estimate_key(audio: np.ndarray, sample_rate: int) -> tuple[int, str]:
    """(tonic pitch class 0..11 with C = 0, "major" | "minor") of [channels, samples] audio."""
    import librosa

    y = _mono(audio, sample_rate)
    chroma = librosa.feature.chroma_cqt(y=y, sr=ANALYSIS_RATE, hop_length=HOP).mean(axis=1)
    scores = key_scores(chroma)
    mode, tonic = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(tonic), MODES[int(mode)]


def tempo_correct(estimate: float, target: float, factors: Sequence[float] = (1.0,),
                  tolerance: float = TEMPO_TOLERANCE) -> bool:
    """Whether `estimate` is within `tolerance` (relative) of `target` times one of `factors`."""
    return any(abs(estimate - f * target) <= tolerance * f * target for f in factors)


def mirex_key_score(tonic: int, mode: str, true_tonic: int, true_mode: str) -> float:
    """MIREX key score: 1 same key, 0.5 fifth (same mode), 0.3 relative, 0.2 parallel, 0 otherwise."""
    interval = (tonic - true_tonic) % 12
    if mode == true_mode:
        if interval == 0:
            return 1.0
        return 0.5 if interval in (5, 7) else 0.0
    if interval == 0:
        return 0.2
    relative = 9 if true_mode == "major" else 3  # relative minor a minor third below, relative major above
    return 0.3 if interval == relative else 0.0


def clip_prompt_following(audio: np.ndarray, sample_rate: int, targets: Mapping[str, Any]) -> dict[str, float]:
    """Estimates and per-clip scores for the targets a prompt states ({} when it states neither tempo nor key)."""
    out: dict[str, float] = {}
    if "bpm" in targets:
        bpm = estimate_tempo(audio, sample_rate)
        out.update(estimated_bpm=bpm, tempo_acc=float(tempo_correct(bpm, targets["bpm"])),
                   tempo_acc_octave=float(tempo_correct(bpm, targets["bpm"], OCTAVE_FACTORS)))
    if "tonic" in targets:
        tonic, mode = estimate_key(audio, sample_rate)
        true_mode = targets.get("mode", mode)
        out.update(estimated_tonic=float(tonic), estimated_minor=float(mode == "minor"),
                   key_acc=float(tonic == targets["tonic"] and mode == true_mode),
                   tonic_acc=float(tonic == targets["tonic"]),
                   key_mirex=mirex_key_score(tonic, mode, targets["tonic"], true_mode))
        if "mode" in targets:
            out["mode_acc"] = float(mode == targets["mode"])
    return out


SCORE_NAMES = ("tempo_acc", "tempo_acc_octave", "key_acc", "tonic_acc", "mode_acc", "key_mirex")


def summarize(per_clip: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of every score over the clips that have it, with `<score>_count` beside it."""
    summary: dict[str, float] = {}
    for name in SCORE_NAMES:
        values = [clip[name] for clip in per_clip if name in clip]
        if values:
            summary[name] = float(np.mean(values))
            summary[f"{name}_count"] = float(len(values))
    return summary

"""Analysis framing shared by the metric backbones and the evaluator's trainer: file audio -> a model's input
(channels, rate, peak level), and fixed-length windows over a clip."""

from __future__ import annotations

import numpy as np

from musicdiff.audio.io import DEFAULT_PEAK_TARGET_DB, apply_channel_policy, normalize, resample


def prepare_for_analysis(audio: np.ndarray, sample_rate: int, target_rate: int, channels: int, *,
                         normalize_before_resample: bool = False) -> np.ndarray:
    """[channels, samples] (or [samples]) file audio -> float32 [channels', samples'] at `target_rate`, peak-normalised
    to -1 dBFS (every Stable Audio metric does; OpenL3 there normalises at the file rate, before resampling)."""
    x = np.asarray(audio, np.float32)
    x = x[None] if x.ndim == 1 else x
    if normalize_before_resample:
        x = normalize(x, "peak", DEFAULT_PEAK_TARGET_DB)
    x = resample(apply_channel_policy(x, channels), int(sample_rate), int(target_rate))
    if not normalize_before_resample:
        x = normalize(x, "peak", DEFAULT_PEAK_TARGET_DB)
    return x


def window_starts(length: int, window: int, hop: int) -> list[int]:
    """Window starts covering `length` samples: every hop while a full window fits, plus one window ending at the
    end when more than half a hop is left uncovered (a clip shorter than a window gets one, zero-padded)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, hop))
    if length - (starts[-1] + window) > hop // 2:
        starts.append(length - window)
    return starts


def cut_windows(audio: np.ndarray, window: int, hop: int) -> np.ndarray:
    """[C, T] -> [windows, C, window], zero-padding a clip shorter than one window."""
    x = np.asarray(audio, np.float32)
    if x.shape[-1] < window:
        x = np.pad(x, ((0, 0), (0, window - x.shape[-1])))
    return np.stack([x[:, s:s + window] for s in window_starts(x.shape[-1], window, hop)])

"""Audio reconstruction metrics in float64 numpy (eval_and_control.md §A.7): pure functions of two waveforms, used by
training previews (training/) and offline evaluation (eval/).

Definitions (auraloss defaults, as stable-audio-tools evaluates them):
- STFT distance: fft 1024, hop 256, Hann 1024, centred with reflect padding; |X| = sqrt(max(re² + im², 1e-8));
  spectral convergence ||X_est| - |X_ref|| / ||X_ref|| per channel (channels fold into the batch) plus the mean
  |log|X_est| - log|X_ref||. `stft_distance` takes several resolutions and averages them.
- Mel distance: the same on magnitudes projected onto librosa's 128-band mel filterbank (sr, n_fft 1024).
- SI-SDR (zero mean, eps 1e-8) per channel, averaged: alpha = <est, ref> / (||ref||² + eps),
  10·log10(||alpha·ref||² / (||alpha·ref - est||² + eps) + eps) dB. A perfect (or rescaled) estimate is capped
  by eps at about 10·log10(||ref||² / eps) dB rather than +inf.

Orientation: `reference` is the real audio and `estimate` the reconstruction (auraloss's documented target and
input). The training loss calls auraloss the other way round (see musicdiff.audio.stft_losses); only the
spectral-convergence denominator differs. The paper's exact eval config is not public; these defaults are assumed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

STFT_DEFAULTS = dict(fft_sizes=(1024,), hop_sizes=(256,), win_lengths=(1024,))
TRAINING_RESOLUTIONS = dict(
    fft_sizes=(2048, 1024, 512, 256, 128, 64, 32), hop_sizes=(512, 256, 128, 64, 32, 16, 8),
    win_lengths=(2048, 1024, 512, 256, 128, 64, 32),
)


def _as_channels(audio: Any) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 1:
        return x[None]
    if x.ndim != 2:
        raise ValueError(f"audio must be [samples] or [channels, samples], got shape {x.shape}")
    return x


def _check_pair(reference: Any, estimate: Any) -> tuple[np.ndarray, np.ndarray]:
    ref, est = _as_channels(reference), _as_channels(estimate)
    if ref.shape != est.shape:
        raise ValueError(f"reference {ref.shape} and estimate {est.shape} must have the same shape")
    return ref, est


def stft_magnitude(x: np.ndarray, n_fft: int, hop: int, win_length: int, eps: float = 1e-8) -> np.ndarray:
    """|STFT| of [..., T] -> [..., frames, n_fft // 2 + 1], torch.stft conventions (centred, reflect, periodic Hann)."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)
    left = (n_fft - win_length) // 2
    window = np.pad(window, (left, n_fft - win_length - left))
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)], mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[..., ::hop, :]
    spectrum = np.fft.rfft(frames * window, axis=-1)
    return np.sqrt(np.maximum(spectrum.real**2 + spectrum.imag**2, eps))


@functools.lru_cache(maxsize=None)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels).astype(np.float64)


def _spectral_distance(ref_mag: np.ndarray, est_mag: np.ndarray) -> float:
    convergence = np.linalg.norm(est_mag - ref_mag, axis=(-2, -1)) / np.linalg.norm(ref_mag, axis=(-2, -1))
    return float(np.mean(convergence) + np.mean(np.abs(np.log(est_mag) - np.log(ref_mag))))


def stft_distance(
    reference: Any, estimate: Any, *, fft_sizes: Sequence[int] = (1024,), hop_sizes: Sequence[int] | None = None,
    win_lengths: Sequence[int] | None = None, eps: float = 1e-8,
) -> float:
    """Spectral convergence + log-magnitude L1, averaged over resolutions (one resolution by default)."""
    ref, est = _check_pair(reference, estimate)
    hop_sizes = hop_sizes or [n // 4 for n in fft_sizes]
    win_lengths = win_lengths or list(fft_sizes)
    total = 0.0
    for n_fft, hop, win in zip(fft_sizes, hop_sizes, win_lengths, strict=True):
        total += _spectral_distance(stft_magnitude(ref, n_fft, hop, win, eps), stft_magnitude(est, n_fft, hop, win, eps))
    return total / len(fft_sizes)


def mel_distance(
    reference: Any, estimate: Any, sample_rate: int, *, n_fft: int = 1024, hop: int = 256, win_length: int = 1024,
    n_mels: int = 128, eps: float = 1e-8,
) -> float:
    """The STFT distance on mel-projected magnitudes (auraloss MelSTFTLoss defaults)."""
    ref, est = _check_pair(reference, estimate)
    basis = _mel_basis(int(sample_rate), n_fft, n_mels)
    ref_mel = stft_magnitude(ref, n_fft, hop, win_length, eps) @ basis.T
    est_mel = stft_magnitude(est, n_fft, hop, win_length, eps) @ basis.T
    return _spectral_distance(ref_mel, est_mel)


def si_sdr(reference: Any, estimate: Any, *, zero_mean: bool = True, eps: float = 1e-8) -> float:
    """Scale-invariant SDR in dB with the optimal scaling of the reference, averaged over channels."""
    ref, est = _check_pair(reference, estimate)
    if zero_mean:
        ref = ref - ref.mean(axis=-1, keepdims=True)
        est = est - est.mean(axis=-1, keepdims=True)
    alpha = np.sum(est * ref, axis=-1) / (np.sum(ref**2, axis=-1) + eps)
    target = alpha[:, None] * ref
    residual = target - est
    ratio = np.sum(target**2, axis=-1) / (np.sum(residual**2, axis=-1) + eps)
    return float(np.mean(10 * np.log10(ratio + eps)))


def reconstruction_metrics(reference: Any, estimate: Any, sample_rate: int) -> dict[str, float]:
    """All metrics of one clip ([channels, samples] or [samples])."""
    return dict(
        stft_distance=stft_distance(reference, estimate, **STFT_DEFAULTS),
        mel_distance=mel_distance(reference, estimate, sample_rate),
        si_sdr=si_sdr(reference, estimate),
        mrstft_distance=stft_distance(reference, estimate, **TRAINING_RESOLUTIONS),
    )


__all__ = ["STFT_DEFAULTS", "TRAINING_RESOLUTIONS", "mel_distance", "reconstruction_metrics", "si_sdr", "stft_distance",
           "stft_magnitude"]

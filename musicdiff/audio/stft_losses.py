"""STFT, mel spectrogram and the multi-resolution STFT loss of the autoencoder recipe, in pure JAX.

Conventions (those of `torch.stft` as the reference calls it, see stable_audio_tools_spec.md §1.9):
- periodic Hann window of `win_length`, zero-padded on both sides to `n_fft` when shorter;
- `center=True` pads `n_fft // 2` samples on both sides, by reflection (default) or with zeros (`pad_mode`);
  `center=False` (the discriminator) frames the raw signal, so frames = 1 + (T - n_fft) // hop;
- spectra are laid out time-major, `[..., frames, n_fft // 2 + 1]`;
- magnitudes are sqrt(max(re² + im², eps)) with eps = 1e-8, so logs stay finite.

The loss follows auraloss as vendored by stable-audio-tools: per resolution, spectral convergence
||Y - X||_F / ||Y||_F (per item, then averaged) plus mean |log X - log Y|, averaged over resolutions. The
reference calls it as loss(reals, decoded), so the spectral-convergence denominator is the *second* argument; keep
that order to reproduce it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

SAO_FFT_SIZES = (2048, 1024, 512, 256, 128, 64, 32)


@dataclasses.dataclass(frozen=True)
class STFTLossConfig:
    """One multi-resolution STFT loss. Hops default to fft / 4 and windows to the FFT size, as in the recipe."""

    fft_sizes: tuple[int, ...] = SAO_FFT_SIZES
    hop_sizes: tuple[int, ...] | None = None
    win_lengths: tuple[int, ...] | None = None
    w_sc: float = 1.0
    w_log_mag: float = 1.0
    eps: float = 1e-8
    # A-weighting pre-filter (101-tap FIR); needs the sample rate.
    perceptual_weighting: bool = False
    sample_rate: int | None = None
    # Mel-scaled variant (auraloss `scale="mel"`): magnitudes are projected on a librosa mel filterbank first.
    n_mels: int | None = None

    def __post_init__(self):
        hops = self.hop_sizes or tuple(n // 4 for n in self.fft_sizes)
        wins = self.win_lengths or tuple(self.fft_sizes)
        if not len(self.fft_sizes) == len(hops) == len(wins):
            raise ValueError(f"STFTLossConfig: {len(self.fft_sizes)} fft sizes, {len(hops)} hops, {len(wins)} windows")
        if any(w > n for w, n in zip(wins, self.fft_sizes)):
            raise ValueError(f"STFTLossConfig: windows {wins} must not exceed the fft sizes {self.fft_sizes}")
        if (self.perceptual_weighting or self.n_mels) and not self.sample_rate:
            raise ValueError("STFTLossConfig: perceptual_weighting and n_mels need sample_rate")
        object.__setattr__(self, "hop_sizes", tuple(hops))
        object.__setattr__(self, "win_lengths", tuple(wins))

    @property
    def resolutions(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(zip(self.fft_sizes, self.hop_sizes, self.win_lengths))


# The recipe of `stable_audio_2_0_vae.json`: 7 resolutions, A-weighted, 44.1 kHz.
SAO_AUTOENCODER_STFT_LOSS = STFTLossConfig(perceptual_weighting=True, sample_rate=44100)


def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window's default), float32."""
    n = np.arange(length)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def _padded_window(n_fft: int, win_length: int) -> np.ndarray:
    window = hann_window(win_length)
    left = (n_fft - win_length) // 2
    return np.pad(window, (left, n_fft - win_length - left))


def frame(x: jax.Array, frame_length: int, hop: int) -> jax.Array:
    """Frames [..., T] into [..., frames, frame_length], frames = 1 + (T - frame_length) // hop."""
    length = x.shape[-1]
    if length < frame_length:
        raise ValueError(f"signal of {length} samples is shorter than one frame of {frame_length}")
    n_frames = 1 + (length - frame_length) // hop
    if frame_length % hop == 0:
        # Slices of a [chunks, hop] view instead of a gather: cheaper, and its gradient needs no scatter.
        ratio = frame_length // hop
        n_chunks = n_frames + ratio - 1
        chunks = x[..., : n_chunks * hop].reshape(*x.shape[:-1], n_chunks, hop)
        return jnp.concatenate([chunks[..., k : k + n_frames, :] for k in range(ratio)], axis=-1)
    index = np.arange(n_frames)[:, None] * hop + np.arange(frame_length)[None, :]
    return x[..., index]


def stft(
    x: jax.Array,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    *,
    center: bool = True,
    pad_mode: str = "reflect",
    normalized: bool = False,
) -> jax.Array:
    """Complex STFT of [..., T] -> [..., frames, n_fft // 2 + 1].

    `normalized` divides by sqrt(sum(window²)), torchaudio's `Spectrogram(normalized=True)` (the discriminator's).
    """
    window = _padded_window(n_fft, win_length or n_fft)
    if center:
        pad = [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)]
        x = jnp.pad(x, pad, mode="reflect" if pad_mode == "reflect" else "constant")
    spectrum = jnp.fft.rfft(frame(x, n_fft, hop_length) * window, axis=-1)
    if normalized:
        spectrum = spectrum / np.float32(np.sqrt(np.sum(window.astype(np.float64) ** 2)))
    return spectrum


def magnitude(spectrum: jax.Array, eps: float = 1e-8) -> jax.Array:
    """sqrt(max(re² + im², eps)): finite logs and gradients at silent bins."""
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    return jnp.sqrt(jnp.maximum(power, eps))


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa's (Slaney) mel filterbank, [n_mels, n_fft // 2 + 1] float32, built once on the host."""
    import warnings

    import librosa

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # empty filters are reported by the loss, which cannot use them
        return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels).astype(np.float32)


def mel_spectrogram(
    x: jax.Array, sample_rate: int, n_fft: int = 2048, hop_length: int = 512, n_mels: int = 128,
    power: float = 1.0, eps: float = 1e-8,
) -> jax.Array:
    """Mel spectrogram [..., frames, n_mels] of [..., T]: (clamped |STFT|)^power projected on the mel filterbank."""
    mag = magnitude(stft(x, n_fft, hop_length), eps)
    if power != 1.0:
        mag = mag**power
    return jnp.matmul(mag, mel_filterbank(sample_rate, n_fft, n_mels).T, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=None)
def a_weighting_fir(sample_rate: int, num_taps: int = 101) -> np.ndarray:
    """Least-squares FIR fit (symmetric, `num_taps`) of the IEC A-weighting curve after a bilinear transform."""
    import scipy.signal

    f1, f2, f3, f4, gain_1khz_db = 20.598997, 107.65265, 737.86223, 12194.217, 1.9997
    numerator = [(2 * np.pi * f4) ** 2 * 10 ** (gain_1khz_db / 20), 0, 0, 0, 0]
    denominator = np.polymul([1, 4 * np.pi * f4, (2 * np.pi * f4) ** 2], [1, 4 * np.pi * f1, (2 * np.pi * f1) ** 2])
    denominator = np.polymul(np.polymul(denominator, [1, 2 * np.pi * f3]), [1, 2 * np.pi * f2])
    b, a = scipy.signal.bilinear(numerator, denominator, fs=sample_rate)
    freqs, response = scipy.signal.freqz(b, a, worN=512, fs=sample_rate)
    return scipy.signal.firls(num_taps, freqs, np.abs(response), fs=sample_rate).astype(np.float32)


def a_weight(x: jax.Array, sample_rate: int) -> jax.Array:
    """Applies the A-weighting FIR to [..., T] with zero padding taps // 2 on both sides (same length out)."""
    taps = a_weighting_fir(sample_rate)
    flat = x.reshape(-1, 1, x.shape[-1])
    pad = len(taps) // 2
    out = jax.lax.conv_general_dilated(
        flat, jnp.asarray(taps)[None, None, :], window_strides=(1,), padding=[(pad, pad)],
        dimension_numbers=("NCH", "OIH", "NCH"), precision=jax.lax.Precision.HIGHEST,
    )
    return out.reshape(x.shape)


def _safe_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    # sqrt has an infinite derivative at 0; identical spectra must give a zero (not NaN) gradient.
    squared = jnp.sum(x**2, axis=axes)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def stft_loss_terms(
    input: jax.Array, target: jax.Array, n_fft: int, hop: int, win: int, config: STFTLossConfig
) -> tuple[jax.Array, jax.Array]:
    """(spectral convergence, log-magnitude L1) at one resolution for signals [N, T]."""
    x_mag = magnitude(stft(input, n_fft, hop, win), config.eps)
    y_mag = magnitude(stft(target, n_fft, hop, win), config.eps)
    if config.n_mels:
        bank = mel_filterbank(config.sample_rate, n_fft, config.n_mels).T
        empty = int(np.sum(bank.sum(axis=0) == 0))
        if empty:
            # An empty mel filter has zero energy and log(0) = -inf; auraloss would silently return NaN.
            raise ValueError(
                f"STFTLossConfig: n_mels={config.n_mels} at n_fft={n_fft}, {config.sample_rate} Hz leaves {empty} "
                f"empty mel filters; use fewer mels or larger FFT sizes"
            )
        x_mag = jnp.matmul(x_mag, bank, precision=jax.lax.Precision.HIGHEST)
        y_mag = jnp.matmul(y_mag, bank, precision=jax.lax.Precision.HIGHEST)
    convergence = jnp.mean(_safe_norm(y_mag - x_mag, (-2, -1)) / _safe_norm(y_mag, (-2, -1)))
    log_magnitude = jnp.mean(jnp.abs(jnp.log(x_mag) - jnp.log(y_mag)))
    return convergence, log_magnitude


def multi_resolution_stft_loss(input: jax.Array, target: jax.Array, config: STFTLossConfig) -> jax.Array:
    """Mean over resolutions of w_sc·SC + w_log_mag·LogMag; leading dims ([B, C, T] etc.) are items.

    Computed in float32 whatever the input dtype; `target` supplies the spectral-convergence denominator.
    """
    if input.shape != target.shape:
        raise ValueError(f"multi_resolution_stft_loss: shapes differ, {input.shape} vs {target.shape}")
    input = input.reshape(-1, input.shape[-1]).astype(jnp.float32)
    target = target.reshape(-1, target.shape[-1]).astype(jnp.float32)
    if config.perceptual_weighting:
        input, target = a_weight(input, config.sample_rate), a_weight(target, config.sample_rate)
    total = jnp.zeros((), jnp.float32)
    for n_fft, hop, win in config.resolutions:
        convergence, log_magnitude = stft_loss_terms(input, target, n_fft, hop, win, config)
        total = total + config.w_sc * convergence + config.w_log_mag * log_magnitude
    return total / len(config.fft_sizes)


def sum_and_difference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mid (L + R) and side (L - R) of stereo [B, 2, T], each [B, 1, T] (no 1/2 factor, as auraloss)."""
    if x.ndim != 3 or x.shape[1] != 2:
        raise ValueError(f"sum_and_difference expects stereo [batch, 2, samples], got {x.shape}")
    return (x[:, 0] + x[:, 1])[:, None], (x[:, 0] - x[:, 1])[:, None]


def sum_and_difference_stft_loss(input: jax.Array, target: jax.Array, config: STFTLossConfig) -> jax.Array:
    """(MR-STFT(mid) + MR-STFT(side)) / 2 for stereo [B, 2, T]."""
    input_sum, input_diff = sum_and_difference(input)
    target_sum, target_diff = sum_and_difference(target)
    return 0.5 * (
        multi_resolution_stft_loss(input_sum, target_sum, config)
        + multi_resolution_stft_loss(input_diff, target_diff, config)
    )


def autoencoder_spectral_loss(
    reals: jax.Array, decoded: jax.Array, config: STFTLossConfig = SAO_AUTOENCODER_STFT_LOSS
) -> dict[str, jax.Array]:
    """The recipe's spectral term for [B, C, T] audio; `spectral` is the weighted total (weight 1.0 applied later).

    Stereo: mid/side MR-STFT + 0.5 · MR-STFT(left) + 0.5 · MR-STFT(right). Mono: plain MR-STFT.
    """
    if reals.ndim != 3:
        raise ValueError(f"autoencoder_spectral_loss expects [batch, channels, samples], got {reals.shape}")
    if reals.shape[1] == 2:
        mid_side = sum_and_difference_stft_loss(reals, decoded, config)
        left = multi_resolution_stft_loss(reals[:, :1], decoded[:, :1], config)
        right = multi_resolution_stft_loss(reals[:, 1:], decoded[:, 1:], config)
        return dict(spectral=mid_side + 0.5 * (left + right), mrstft_mid_side=mid_side, mrstft_left=left,
                    mrstft_right=right)
    loss = multi_resolution_stft_loss(reals, decoded, config)
    return dict(spectral=loss, mrstft=loss)


def num_frames(num_samples: int, n_fft: int, hop: int, center: bool = True) -> int:
    """Frames that `stft` yields for a signal of `num_samples`."""
    padded = num_samples + (2 * (n_fft // 2) if center else 0)
    return 1 + (padded - n_fft) // hop if padded >= n_fft else 0


__all__ = [
    "SAO_AUTOENCODER_STFT_LOSS",
    "SAO_FFT_SIZES",
    "STFTLossConfig",
    "a_weight",
    "a_weighting_fir",
    "autoencoder_spectral_loss",
    "frame",
    "hann_window",
    "magnitude",
    "mel_filterbank",
    "mel_spectrogram",
    "multi_resolution_stft_loss",
    "num_frames",
    "stft",
    "stft_loss_terms",
    "sum_and_difference",
    "sum_and_difference_stft_loss",
]

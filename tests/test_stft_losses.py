"""STFT and multi-resolution STFT loss against closed forms and an independent float64 numpy implementation."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.signal

from musicdiff.audio.metrics import stft_magnitude
from musicdiff.audio.stft_losses import (
    SAO_AUTOENCODER_STFT_LOSS,
    STFTLossConfig,
    a_weighting_fir,
    autoencoder_spectral_loss,
    mel_spectrogram,
    multi_resolution_stft_loss,
    num_frames,
    stft,
    sum_and_difference_stft_loss,
)


# ---- numpy reference (torch.stft semantics: periodic Hann, centre with reflect padding) -----------------------

def np_stft_mag(x, n_fft, hop, win, eps=1e-8):
    """The NumPy |STFT| of audio/metrics.py (an independent float64 implementation of the JAX losses' STFT)."""
    return stft_magnitude(np.asarray(x, np.float64), n_fft, hop, win, eps)


def np_mrstft(x, y, fft_sizes, hops, wins, mel=None, weight_taps=None):
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
    if weight_taps is not None:
        x = np.stack([np.convolve(row, weight_taps, mode="same") for row in x])
        y = np.stack([np.convolve(row, weight_taps, mode="same") for row in y])
    total = 0.0
    for n_fft, hop, win in zip(fft_sizes, hops, wins):
        xm, ym = np_stft_mag(x, n_fft, hop, win), np_stft_mag(y, n_fft, hop, win)
        if mel is not None:
            bank = librosa.filters.mel(sr=mel[0], n_fft=n_fft, n_mels=mel[1]).astype(np.float64)
            xm, ym = xm @ bank.T, ym @ bank.T
        sc = np.mean(np.linalg.norm(ym - xm, axis=(-2, -1)) / np.linalg.norm(ym, axis=(-2, -1)))
        total += sc + np.mean(np.abs(np.log(xm) - np.log(ym)))
    return total / len(fft_sizes)


def random_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 0.3
    y = (x + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    return x, y


# ---- tests ------------------------------------------------------------------------------------------------------

def test_sine_peaks_at_its_bin():
    sample_rate, n_fft, bin_index = 16000, 512, 37
    t = np.arange(8192) / sample_rate
    sine = np.sin(2 * np.pi * bin_index * sample_rate / n_fft * t).astype(np.float32)
    spec = np.abs(np.asarray(stft(jnp.asarray(sine), n_fft, 128)))
    assert spec.shape == (num_frames(8192, n_fft, 128), n_fft // 2 + 1) == (65, 257)
    assert np.all(np.argmax(spec[2:-2], axis=-1) == bin_index)
    # A full-length Hann-windowed sine on an exact bin has magnitude sum(window) / 2 = n_fft / 4.
    np.testing.assert_allclose(spec[10, bin_index], n_fft / 4, rtol=1e-4)


def test_uncentred_normalised_stft_frames():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    spec = np.asarray(stft(jnp.asarray(x), 256, 64, center=False, normalized=True))
    assert spec.shape == (1 + (1000 - 256) // 64, 129)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(256) / 256)
    expected = np.fft.rfft(x[64:320] * window) / np.sqrt(np.sum(window**2))
    np.testing.assert_allclose(spec[1], expected, rtol=1e-4, atol=1e-4)


def test_identical_signals_give_zero_loss_and_finite_gradient():
    x, _ = random_pair((2, 1, 4096))
    config = STFTLossConfig()
    loss = jax.jit(lambda a, b: multi_resolution_stft_loss(a, b, config))  # one program, not op-by-op dispatch
    assert float(loss(jnp.asarray(x), jnp.asarray(x))) == 0.0
    grad = jax.jit(jax.grad(lambda a: multi_resolution_stft_loss(a, jnp.asarray(x), config)))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_different_signals_give_positive_loss():
    x, y = random_pair((2, 1, 4096))
    assert float(multi_resolution_stft_loss(jnp.asarray(x), jnp.asarray(y), STFTLossConfig())) > 0.1


@pytest.mark.parametrize(
    "config",
    [
        STFTLossConfig(),
        STFTLossConfig(fft_sizes=(64, 100), hop_sizes=(24, 30), win_lengths=(48, 100)),  # hop ∤ fft, short window
        STFTLossConfig(fft_sizes=(1024, 256), n_mels=32, sample_rate=44100),
    ],
    ids=["sao_resolutions", "odd_hops", "mel"],
)
def test_matches_numpy_reference(config):
    x, y = random_pair((2, 2, 4096), seed=3)
    got = float(jax.jit(multi_resolution_stft_loss, static_argnums=2)(jnp.asarray(x), jnp.asarray(y), config))
    mel = (config.sample_rate, config.n_mels) if config.n_mels else None
    want = np_mrstft(x, y, config.fft_sizes, config.hop_sizes, config.win_lengths, mel=mel)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_perceptual_weighting_filter_and_loss():
    taps = a_weighting_fir(44100)
    assert taps.shape == (101,) and np.allclose(taps, taps[::-1])  # linear phase, so correlation == convolution
    _, response = scipy.signal.freqz(taps, worN=[50.0, 1000.0, 3000.0], fs=44100)
    gain_db = 20 * np.log10(np.abs(response))
    # IEC A-curve: -30.2 dB at 50 Hz, 0 dB at 1 kHz, +1.2 dB at 3 kHz; a 101-tap fit is coarse at low frequency.
    assert gain_db[0] < -15 and abs(gain_db[1]) < 0.3 and abs(gain_db[2] - 1.2) < 0.5
    x, y = random_pair((1, 2, 4096), seed=4)
    config = STFTLossConfig(fft_sizes=(512, 128), perceptual_weighting=True, sample_rate=44100)
    got = float(multi_resolution_stft_loss(jnp.asarray(x), jnp.asarray(y), config))
    want = np_mrstft(x, y, (512, 128), (128, 32), (512, 128), weight_taps=taps.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_spectral_convergence_denominator_is_the_second_argument():
    x, _ = random_pair((1, 1, 4096), seed=5)
    sc_only = STFTLossConfig(fft_sizes=(256,), w_log_mag=0.0)
    log_only = STFTLossConfig(fft_sizes=(256,), w_sc=0.0)
    x2 = jnp.asarray(2 * x)
    # ||2X - X|| / ||2X|| = 1/2 and ||X - 2X|| / ||X|| = 1; the log term is |log 2| either way.
    np.testing.assert_allclose(float(multi_resolution_stft_loss(jnp.asarray(x), x2, sc_only)), 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(multi_resolution_stft_loss(x2, jnp.asarray(x), sc_only)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(multi_resolution_stft_loss(jnp.asarray(x), x2, log_only)), np.log(2), rtol=1e-4)


def test_sum_and_difference_handling():
    x, y = random_pair((2, 2, 4096), seed=6)
    config = STFTLossConfig(fft_sizes=(512, 64))
    hops, wins = (128, 16), (512, 64)
    got = float(sum_and_difference_stft_loss(jnp.asarray(x), jnp.asarray(y), config))
    mid = np_mrstft(x[:, 0] + x[:, 1], y[:, 0] + y[:, 1], (512, 64), hops, wins)
    side = np_mrstft(x[:, 0] - x[:, 1], y[:, 0] - y[:, 1], (512, 64), hops, wins)
    np.testing.assert_allclose(got, (mid + side) / 2, rtol=1e-5)
    # Swapping L and R keeps the mid and negates the side: same magnitudes, same loss.
    swapped = float(sum_and_difference_stft_loss(jnp.asarray(x[:, ::-1]), jnp.asarray(y[:, ::-1]), config))
    np.testing.assert_allclose(swapped, got, rtol=1e-6)
    terms = autoencoder_spectral_loss(jnp.asarray(x), jnp.asarray(y), config)
    left = np_mrstft(x[:, 0], y[:, 0], (512, 64), hops, wins)
    right = np_mrstft(x[:, 1], y[:, 1], (512, 64), hops, wins)
    np.testing.assert_allclose(float(terms["spectral"]), (mid + side) / 2 + 0.5 * (left + right), rtol=1e-5)
    mono = autoencoder_spectral_loss(jnp.asarray(x[:, :1]), jnp.asarray(y[:, :1]), config)
    np.testing.assert_allclose(float(mono["spectral"]), left, rtol=1e-5)
    with pytest.raises(ValueError, match="stereo"):
        sum_and_difference_stft_loss(jnp.asarray(x[:, :1]), jnp.asarray(y[:, :1]), config)


def test_mel_loss_refuses_empty_filters():
    x, y = random_pair((1, 1, 2048))
    with pytest.raises(ValueError, match="empty mel filters"):
        multi_resolution_stft_loss(jnp.asarray(x), jnp.asarray(y), STFTLossConfig((256,), n_mels=128, sample_rate=44100))


def test_mel_spectrogram_matches_librosa_filterbank():
    x = np.random.default_rng(7).standard_normal(8192).astype(np.float32)
    got = np.asarray(mel_spectrogram(jnp.asarray(x), 22050, n_fft=1024, hop_length=256, n_mels=80))
    bank = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80).astype(np.float64)
    want = np_stft_mag(x, 1024, 256, 1024) @ bank.T
    assert got.shape == want.shape == (33, 80)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_recipe_config():
    assert SAO_AUTOENCODER_STFT_LOSS.fft_sizes == (2048, 1024, 512, 256, 128, 64, 32)
    assert SAO_AUTOENCODER_STFT_LOSS.hop_sizes == (512, 256, 128, 64, 32, 16, 8)
    assert SAO_AUTOENCODER_STFT_LOSS.win_lengths == SAO_AUTOENCODER_STFT_LOSS.fft_sizes
    assert SAO_AUTOENCODER_STFT_LOSS.perceptual_weighting and SAO_AUTOENCODER_STFT_LOSS.sample_rate == 44100

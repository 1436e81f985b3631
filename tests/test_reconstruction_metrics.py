"""Reconstruction metrics against closed forms; the report writer."""

import json
import math

import librosa
import numpy as np
import pytest

from musicdiff.audio.metrics import mel_distance, reconstruction_metrics, si_sdr, stft_distance, stft_magnitude
from musicdiff.eval.reconstruction import aggregate, write_report

SR = 44100


def clip(seed=0, channels=2, samples=16384):
    return 0.3 * np.random.default_rng(seed).standard_normal((channels, samples))


def noise_at_snr(signal, snr_db, seed):
    """Zero-mean noise exactly orthogonal to the zero-mean signal, scaled to the requested SNR."""
    s = signal - signal.mean()
    n = np.random.default_rng(seed).standard_normal(signal.shape)
    n -= n.mean()
    n -= (n @ s) / (s @ s) * s
    n *= np.sqrt((s @ s) / (n @ n) / 10 ** (snr_db / 10))
    return n


def test_stft_magnitude_matches_librosa():
    x = clip(channels=1)[0]
    ours = stft_magnitude(x, 1024, 256, 1024, eps=0.0)
    theirs = np.abs(librosa.stft(x, n_fft=1024, hop_length=256, window="hann", center=True, pad_mode="reflect")).T
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_si_sdr_of_a_rescaled_signal_is_capped_very_high():
    s = clip(1, channels=1)[0]
    s0 = s - s.mean()
    expected = 10 * math.log10(0.25 * (s0 @ s0) / 1e-8)  # residual ~ 0, so eps in the denominator caps it
    got = si_sdr(s, 0.5 * s)
    assert got > 60
    np.testing.assert_allclose(got, expected, atol=1e-3)


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 12.5, 30.0])
def test_si_sdr_equals_snr_of_orthogonal_noise(snr_db):
    s = clip(2, channels=1)[0]
    estimate = s + noise_at_snr(s, snr_db, seed=3)
    np.testing.assert_allclose(si_sdr(s, estimate), snr_db, atol=0.1)


def test_si_sdr_is_scale_and_offset_invariant_and_averages_channels():
    s = clip(4, channels=2)
    noisy = np.stack([s[0] + noise_at_snr(s[0], 10.0, 5), s[1] + noise_at_snr(s[1], 30.0, 6)])
    base = si_sdr(s, noisy)
    np.testing.assert_allclose(base, 20.0, atol=0.1)  # mean of 10 dB and 30 dB
    np.testing.assert_allclose(si_sdr(s, 3.0 * noisy), base, atol=1e-6)
    np.testing.assert_allclose(si_sdr(s, noisy + 0.7), base, atol=1e-6)  # zero-mean removes the offset
    assert si_sdr(s, noisy[::-1]) < 0  # unrelated channels


@pytest.mark.parametrize("gain", [2.0, 0.5])
def test_spectral_distances_zero_for_identical_and_closed_form_for_gain(gain):
    x = clip(7)
    assert stft_distance(x, x) == 0.0
    assert mel_distance(x, x, SR) == 0.0
    # |X_est| = g |X_ref| everywhere: SC = |g - 1| and the log term is |log g|.
    expected = abs(gain - 1) + abs(math.log(gain))
    np.testing.assert_allclose(stft_distance(x, gain * x), expected, rtol=1e-9)
    np.testing.assert_allclose(mel_distance(x, gain * x, SR), expected, rtol=1e-9)
    np.testing.assert_allclose(
        stft_distance(x, gain * x, fft_sizes=(2048, 256, 32)), expected, rtol=1e-9)


def test_metrics_of_a_clip_and_shape_checks():
    x = clip(8)
    metrics = reconstruction_metrics(x, x + 0.01 * clip(9), SR)
    assert set(metrics) == {"stft_distance", "mel_distance", "si_sdr", "mrstft_distance"}
    assert metrics["si_sdr"] > 25 and 0 < metrics["stft_distance"] < metrics["mrstft_distance"] + 1
    mono = reconstruction_metrics(x[0], x[0], SR)
    assert mono["stft_distance"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        si_sdr(x, x[:, :-1])


def test_aggregate_mean_std_count():
    summary = aggregate([dict(si_sdr=10.0, mel=1.0), dict(si_sdr=14.0, mel=3.0), dict(si_sdr=12.0)])
    assert summary["si_sdr"] == dict(mean=12.0, std=math.sqrt(8 / 3), count=3)
    assert summary["mel"] == dict(mean=2.0, std=1.0, count=2)
    with pytest.raises(ValueError, match="non-finite"):
        aggregate([dict(si_sdr=float("nan"))])
    with pytest.raises(ValueError, match="no clips"):
        aggregate([])


def test_write_report_json_and_markdown(tmp_path):
    metrics = dict(si_sdr=dict(mean=12.345678901, std=1.5, count=3), steps=1000)
    json_path, md_path = write_report(metrics, tmp_path / "eval", "Autoencoder reconstruction",
                                      notes=["defaults assumed"])
    payload = json.loads(json_path.read_text())
    assert payload["title"] == "Autoencoder reconstruction"
    assert payload["metrics"]["si_sdr"]["mean"] == 12.345678901 and payload["notes"] == ["defaults assumed"]
    text = md_path.read_text()
    assert text.startswith("# Autoencoder reconstruction")
    assert "| metric | value | mean | std | count |" in text
    assert "| si_sdr |  | 12.3457 | 1.5 | 3 |" in text and "| steps | 1000 |  |  |  |" in text
    assert "- defaults assumed" in text
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["report.json", "report.md"]  # no temp files

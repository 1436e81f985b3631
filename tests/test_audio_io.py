"""musicdiff.audio.io: decoding, resampling, channel policy, normalisation, atomic writes."""

import math
import os

import numpy as np
import pytest
import soundfile

from musicdiff.audio import io as audio_io


def sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path, frames_by_channel: np.ndarray, rate: int, subtype: str = "FLOAT"):
    soundfile.write(path, np.asarray(frames_by_channel).T, rate, subtype=subtype)
    return path


def test_resample_keeps_a_1khz_sine_at_1khz(tmp_path):
    path = write(tmp_path / "sine48k.wav", sine(1000.0, 48000, 1.0)[None], 48000)
    audio = audio_io.load_audio(path, sample_rate=44100, channels=1)
    assert audio.shape == (1, 44100)
    spectrum = np.abs(np.fft.rfft(audio[0] * np.hanning(44100)))
    assert np.argmax(spectrum) == 1000  # one second at 44.1 kHz: bin k is k Hz
    assert abs(np.sqrt(np.mean(audio[0, 2000:-2000] ** 2)) - 0.5 / math.sqrt(2)) < 1e-3


@pytest.mark.parametrize("frames,src,dst,expected", [(48000, 48000, 44100, 44100), (22050, 22050, 44100, 44100),
                                                     (400, 48000, 44100, 368), (7, 44100, 44100, 7)])
def test_resampled_length_rounds_half_up(frames, src, dst, expected):
    assert audio_io.resampled_length(frames, src, dst) == expected


def test_resample_array_has_the_closed_form_length():
    audio = np.zeros((2, 48001), np.float32)
    assert audio_io.resample(audio, 48000, 44100).shape == (2, audio_io.resampled_length(48001, 48000, 44100))


@pytest.mark.parametrize("rate", [48000, 22050, 16000])
def test_partial_read_matches_the_same_span_of_a_whole_file_resample(tmp_path, rate):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, (2, rate * 2)).astype(np.float32)
    path = write(tmp_path / "noise.wav", noise, rate)
    whole = audio_io.load_audio(path, 44100)
    for offset in (0, 1, 777, 20000, whole.shape[1] - 3000):
        part = audio_io.load_audio(path, 44100, offset=offset, num_samples=4096)
        expected = whole[:, offset:offset + 4096]
        assert part.shape == expected.shape
        np.testing.assert_allclose(part, expected, atol=1e-5)


def test_same_rate_read_returns_the_written_samples_and_stops_at_the_end(tmp_path):
    ramp = np.stack([np.linspace(-0.5, 0.5, 1000), np.linspace(0.5, -0.5, 1000)]).astype(np.float32)
    path = write(tmp_path / "ramp.wav", ramp, 44100)
    np.testing.assert_array_equal(audio_io.load_audio(path, 44100, offset=100, num_samples=50), ramp[:, 100:150])
    assert audio_io.load_audio(path, 44100, offset=990, num_samples=50).shape == (2, 10)
    assert audio_io.load_audio(path, 44100, offset=5000, num_samples=50).shape == (2, 0)


def test_flac_and_in_memory_bytes_decode_like_wav(tmp_path):
    tone = sine(440.0, 44100, 0.5)[None]
    flac = tmp_path / "tone.flac"
    soundfile.write(flac, tone.T, 44100, subtype="PCM_24")
    from_path = audio_io.load_audio(flac, channels=None)
    from_bytes = audio_io.load_audio(flac.read_bytes(), channels=None)
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_allclose(from_path, tone, atol=2.0 ** -22)
    info = audio_io.read_info(flac)
    assert (info.sample_rate, info.channels, info.frames, info.format) == (44100, 1, 22050, "FLAC")
    assert info.duration == 0.5


def test_channel_policy_by_closed_form():
    mono = np.full((1, 4), 0.3, np.float32)
    np.testing.assert_array_equal(audio_io.apply_channel_policy(mono, 2), np.full((2, 4), 0.3, np.float32))
    quad = np.array([0.1, 0.2, 0.3, 0.6], np.float32)[:, None] * np.ones((1, 5), np.float32)
    stereo = audio_io.apply_channel_policy(quad, 2)
    np.testing.assert_allclose(stereo, [[0.2] * 5, [0.4] * 5], rtol=1e-6)  # (0.1+0.3)/2, (0.2+0.6)/2
    np.testing.assert_allclose(audio_io.apply_channel_policy(quad, 1), [[0.3] * 5], rtol=1e-6)
    pair = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    np.testing.assert_array_equal(audio_io.apply_channel_policy(pair, 2), pair)
    with pytest.raises(ValueError, match="channels=3"):
        audio_io.apply_channel_policy(pair, 3)


def test_load_audio_applies_the_channel_policy_to_files(tmp_path):
    quad = np.stack([sine(100.0 * (k + 1), 44100, 0.2) for k in range(4)])
    path = write(tmp_path / "quad.wav", quad, 44100)
    np.testing.assert_allclose(audio_io.load_audio(path), [(quad[0] + quad[2]) / 2, (quad[1] + quad[3]) / 2],
                               atol=1e-7)
    mono_path = write(tmp_path / "mono.wav", quad[:1], 44100)
    np.testing.assert_array_equal(audio_io.load_audio(mono_path), np.concatenate([quad[:1], quad[:1]]))


def test_peak_and_loudness_normalisation_reach_their_targets():
    tone = sine(440.0, 44100, 1.0, amplitude=0.1)[None]
    peaked = audio_io.normalize(tone, "peak")
    assert abs(np.max(np.abs(peaked)) - 10 ** (-1 / 20)) < 1e-4
    loud = audio_io.normalize(tone, "loudness", target_db=-20.0)
    assert abs(np.sqrt(np.mean(loud.astype(np.float64) ** 2)) - 0.1) < 1e-4  # -20 dBFS RMS
    spiky = np.full((1, 10000), 1e-3, np.float32)
    spiky[0, 5] = 0.5
    limited = audio_io.normalize(spiky, "loudness", target_db=-10.0)
    assert abs(np.max(np.abs(limited)) - 10 ** (-1 / 20)) < 1e-4  # held at the -1 dBFS peak ceiling
    assert audio_io.normalize(tone, "none") is tone
    silence = np.zeros((1, 10), np.float32)
    np.testing.assert_array_equal(audio_io.normalize(silence, "peak"), silence)
    with pytest.raises(ValueError, match="normalize"):
        audio_io.normalize(tone, "lufs")


def test_levels_in_dbfs():
    assert audio_io.peak_db(np.array([[0.5, -1.0]])) == 0.0
    assert abs(audio_io.rms_db(np.full((2, 8), 0.1)) + 20.0) < 1e-9
    assert audio_io.peak_db(np.zeros((1, 4))) == -200.0


def test_write_audio_is_atomic_and_round_trips(tmp_path):
    tone = np.stack([sine(440.0, 22050, 0.25), sine(660.0, 22050, 0.25)])
    target = tmp_path / "sub" / "out.wav"
    audio_io.write_audio(target, tone, 22050, subtype="FLOAT")
    back, rate = soundfile.read(target, dtype="float32", always_2d=True)
    assert rate == 22050
    np.testing.assert_array_equal(back.T, tone)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="subtype"):
        audio_io.write_audio(target, tone, 22050, subtype="NOT_A_SUBTYPE")
    assert target.read_bytes() == before
    assert sorted(os.listdir(target.parent)) == ["out.wav"]  # no temporary file left behind
    audio_io.write_audio(tmp_path / "mono.flac", tone[0], 22050)
    assert audio_io.read_info(tmp_path / "mono.flac").channels == 1


def test_spectrogram_grid_lays_out_one_panel_per_clip(tmp_path):
    from PIL import Image

    from musicdiff.audio.spectrogram import save_spectrogram_grid

    t = np.arange(16000) / 16000
    clip = (np.sin(2 * np.pi * 440 * t)[None].astype(np.float32), 16000)
    path = save_spectrogram_grid([[clip, clip, clip], [clip, clip, clip]], ["real", "reconstruction", "generation"],
                                 ["a caption", "another caption"], tmp_path / "grid.png")
    width, height = Image.open(path).size
    assert (width, height) == (1200, 440)  # 4.0 in per column, 2.2 in per row, at 100 dpi

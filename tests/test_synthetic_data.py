"""The synthetic CC0 dataset: determinism, audio format, instruments, honest tempo and key, captions, folder and CLI."""

import itertools
import json
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile

from data_pipelines.audio_folder import scan_folder
from data_pipelines.synthetic import captions, instruments, music, render, writer
from musicdiff.config import load_config

SR = 44100
# Krumhansl-Kessler key profiles (Krumhansl 1990), tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
PITCH_CLASSES = {"C": 0, "C#": 1, "Db": 1, "D": 2, "Eb": 3, "E": 4, "F": 5, "F#": 6, "Gb": 6, "G": 7, "G#": 8,
                 "Ab": 8, "A": 9, "Bb": 10, "B": 11}


def estimate_key(audio: np.ndarray, sample_rate: int) -> tuple[int, str]:
    chroma = librosa.feature.chroma_cqt(y=audio.mean(0), sr=sample_rate, hop_length=2048).sum(axis=1)
    scores = {(tonic, mode): np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]
              for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)) for tonic in range(12)}
    return max(scores, key=scores.get)


def onset_autocorrelation(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """Autocorrelation of the onset-strength envelope and its frame rate (frames per second)."""
    hop = 128
    envelope = librosa.onset.onset_strength(y=audio.mean(0), sr=sample_rate, hop_length=hop)
    envelope = envelope - envelope.mean()
    spectrum = np.fft.rfft(envelope, 2 * len(envelope))
    autocorr = np.fft.irfft(np.abs(spectrum) ** 2)[: len(envelope)]
    return autocorr / autocorr[0], sample_rate / hop


def best_tempo(autocorr: np.ndarray, frame_rate: float, low: float, high: float) -> float:
    """The BPM in [low, high] whose beat lag and its first multiples carry the most onset periodicity."""
    candidates = np.arange(low, high, 0.05)
    lags = frame_rate * 60.0 / candidates
    score = sum(np.interp(k * lags, np.arange(len(autocorr)), autocorr, right=0.0) for k in (1, 2, 3, 4))
    return float(candidates[np.argmax(score)])


def test_same_seed_is_bit_identical_and_seeds_differ():
    first, again, other = render.render_clip(7, 2.0), render.render_clip(7, 2.0), render.render_clip(8, 2.0)
    assert np.array_equal(first.audio, again.audio)
    assert first.attributes == again.attributes and first.caption == again.caption and first.title == again.title
    assert first.audio.shape == other.audio.shape
    assert not np.allclose(first.audio, other.audio, atol=1e-3)
    assert first.attributes != other.attributes


@pytest.mark.parametrize("seed,seconds,sample_rate", [(0, 3.0, 44100), (1, 2.5, 22050), (2, 1.0, 48000)])
def test_format_stereo_headroom_and_fades(seed, seconds, sample_rate):
    clip = render.render_clip(seed, seconds, sample_rate)
    audio = clip.audio
    assert audio.dtype == np.float32 and audio.shape == (2, round(seconds * sample_rate))
    assert clip.sample_rate == sample_rate == clip.attributes["sample_rate"]
    assert np.all(np.isfinite(audio))
    peak_db = 20 * np.log10(np.max(np.abs(audio)))
    assert -1.05 < peak_db <= -0.99, "mastered to a -1 dBFS peak: loud, never clipping"
    assert not np.allclose(audio[0], audio[1], atol=1e-3), "instruments are panned, so the sides differ"
    assert np.max(np.abs(audio[:, :2])) < 0.05 and np.max(np.abs(audio[:, -2:])) < 0.05, "faded in and out"


def test_at_least_six_instruments_each_audible_in_tune_and_distinct():
    assert len(instruments.INSTRUMENTS) >= 6 and "drums" in instruments.INSTRUMENTS
    length = int(0.8 * SR)
    notes = {}
    for name in instruments.PITCHED_INSTRUMENTS:
        voice = instruments.INSTRUMENTS[name].voice
        for midi in (57, 60):  # A3 and C4: the note's own pitch class must dominate its chroma
            note = voice(instruments.midi_to_hz(midi), int(0.6 * SR), SR, 0.8, np.random.default_rng(0))
            assert np.all(np.isfinite(note)) and np.sqrt(np.mean(note ** 2)) > 0.01, name
            chroma = librosa.feature.chroma_stft(y=note, sr=SR, n_fft=8192, tuning=0.0).sum(axis=1)
            heard = int(np.argmax(chroma))
            assert heard == midi % 12, f"{name} at MIDI {midi} sounds as pitch class {heard}"
        notes[name] = np.pad(voice(220.0, int(0.6 * SR), SR, 0.8, np.random.default_rng(0)), (0, length))[:length]
    drums = render.render_clip(0, 2.0, instruments_allowed=("drums",))
    assert drums.attributes["instruments"] == ["drums"]
    notes["drums"] = drums.audio.mean(0)[:length]

    def timbre(signal):  # log-mel spectrum in four time segments: spectral shape and how it evolves
        mel = librosa.feature.melspectrogram(y=signal, sr=SR, n_fft=2048, hop_length=512, n_mels=32)
        segments = np.stack([part.mean(axis=1) for part in np.array_split(mel, 4, axis=1)])
        return np.clip(10 * np.log10(segments / segments.max() + 1e-12), -60, 0).ravel() / 60

    features = {name: timbre(signal) for name, signal in notes.items()}
    for a, b in itertools.combinations(features, 2):
        distance = float(np.sqrt(np.mean((features[a] - features[b]) ** 2)))
        assert distance > 0.08, f"{a} and {b} sound alike (timbre distance {distance:.3f})"


def test_karplus_strong_guitar_is_in_tune():
    for midi in (40, 52, 64, 76):
        freq = instruments.midi_to_hz(midi)
        note = instruments.guitar(freq, SR, SR, 0.8, np.random.default_rng(midi))[2000:2000 + 32768]
        spectrum = np.abs(np.fft.rfft(note * np.hanning(len(note))))
        peak = int(round(freq * len(note) / SR))
        peak = peak - 3 + int(np.argmax(spectrum[peak - 3:peak + 4]))
        a, b, c = np.log(spectrum[peak - 1:peak + 2])
        measured = (peak + 0.5 * (a - c) / (a - 2 * b + c)) * SR / len(note)
        assert abs(1200 * np.log2(measured / freq)) < 3.0, f"MIDI {midi}: {measured:.2f} Hz for {freq:.2f} Hz"


@pytest.mark.parametrize("bpm,seed", [(72, 1), (97, 2), (128, 3), (155, 4)])
def test_tempo_is_the_stated_bpm(bpm, seed):
    for allowed in (("drums",), render.ALL_INSTRUMENTS):
        clip = render.render_clip(seed, 6.0, instruments_allowed=allowed, bpm=bpm)
        assert clip.attributes["bpm"] == bpm and str(bpm) in clip.caption
        autocorr, frame_rate = onset_autocorrelation(clip.audio, SR)
        near = best_tempo(autocorr, frame_rate, bpm * 0.9, bpm * 1.1)
        assert abs(near / bpm - 1) < 0.005, f"beat grid at {near:.2f} BPM, stated {bpm} ({allowed})"
        anywhere = best_tempo(autocorr, frame_rate, 60, 200)
        assert min(abs(anywhere / bpm - ratio) for ratio in (0.5, 1.0, 2.0)) < 0.02, (anywhere, bpm, allowed)


def test_tempo_grid_draws_every_step_and_step_one_is_the_whole_bpm_draw():
    grid = {render.plan_clip(seed, 4.0, 16000, bpm_step=10).bpm for seed in range(300)}
    assert grid == set(range(70, 161, 10))
    for seed in range(20):  # step 1 consumes the generator exactly as integers(bpm_min, bpm_max + 1) does
        assert render.plan_clip(seed, 4.0).bpm == int(np.random.default_rng(seed).integers(70, 161))


def test_drawn_tempo_attribute_matches_the_audio():
    for seed in (10, 11, 12):
        clip = render.render_clip(seed, 6.0)
        bpm = clip.attributes["bpm"]
        assert 70 <= bpm <= 160
        autocorr, frame_rate = onset_autocorrelation(clip.audio, SR)
        assert abs(best_tempo(autocorr, frame_rate, bpm * 0.9, bpm * 1.1) / bpm - 1) < 0.005


def test_key_is_audible():
    cases = [(seed, {}) for seed in range(6)]
    cases += [(20, {"key": "Eb", "mode": "minor"}), (21, {"key": "E", "mode": "major"})]
    hits = []
    for seed, overrides in cases:
        clip = render.render_clip(seed, 10.0, **overrides)
        attrs = clip.attributes
        for name, value in overrides.items():
            assert attrs[name] == value
        stated = (PITCH_CLASSES[attrs["key"]], attrs["mode"])
        hits.append(estimate_key(clip.audio, SR) == stated)
    assert sum(hits) >= 6, f"chroma matched the stated key in {sum(hits)} of {len(hits)} clips: {hits}"


def test_progression_starts_on_tonic_and_melody_stays_in_key():
    for seed in range(12):
        plan = render.plan_clip(seed, 10.0)
        tonic_chord = plan.key.name + ("m" if plan.key.mode == "minor" else "")
        attrs = render.attributes(plan)
        assert attrs["chords"][0] == tonic_chord and attrs["progression"][0] in ("I", "i")
        if len(attrs["chords"]) >= 3:
            assert attrs["chords"][-1] == tonic_chord
        notes = music.melody(plan.key, list(plan.chords), np.random.default_rng(seed), 0, 10.0 * plan.bpm / 60)
        leading_tone = (plan.key.tonic + 11) % 12
        allowed = set(plan.key.scale) | ({leading_tone} if plan.key.mode == "minor" else set())
        assert notes and {note.midi % 12 for note in notes} <= allowed
        assert notes[-1].midi % 12 == plan.key.tonic


def test_captions_state_key_tempo_and_instruments_with_varied_phrasing():
    openings = set()
    for seed in range(30):
        plan = render.plan_clip(seed, 10.0)
        attrs = render.attributes(plan)
        text = captions.caption(attrs, np.random.default_rng([seed, 1]))
        assert attrs["key_name"] in text and str(attrs["bpm"]) in text, text
        for name in attrs["instruments"]:
            assert (name if name != "drums" else "drum") in text.lower(), (name, text)
        assert attrs["mood"] in text or attrs["energy"] in text.lower(), text
        openings.add(" ".join(text.split()[:2]))
    assert len(openings) >= 10


def test_attribute_schema():
    clip = render.render_clip(5, 2.0)
    attrs = clip.attributes
    required = {"key": str, "mode": str, "bpm": int, "instruments": list, "chords": list, "mood": str, "energy": str,
                "seconds": float, "seed": int}
    for name, kind in required.items():
        assert isinstance(attrs[name], kind), name
    assert attrs["mode"] in ("major", "minor") and attrs["key"] in PITCH_CLASSES and attrs["seed"] == 5
    assert set(attrs["instruments"]) <= set(render.ALL_INSTRUMENTS)
    assert clip.artist == "musicdiff synthetic" and clip.license == "CC0-1.0" and clip.title
    assert json.loads(json.dumps(attrs)) == attrs


def test_write_dataset_folder(tmp_path, repo_root):
    config = load_config(f"{repo_root}/configs/synthetic_data.py:tiny",
                         ["num_clips=3", "num_workers=1", "seconds=1.5", "seed=2"])
    summary = writer.write_dataset(config, tmp_path)
    assert summary["clips"] == 3
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for index, line in enumerate(lines):
        entry = json.loads(line)
        assert set(entry) == {"path", "caption", "license", "attributes", "title", "artist"}
        assert entry["path"] == f"audio/{index:06d}.wav" and entry["license"] == "CC0-1.0"
        assert entry["artist"] == "musicdiff synthetic" and entry["attributes"]["seed"] == 2 * 1_000_000 + index
        info = soundfile.info(str(tmp_path / entry["path"]))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (44100, 2, 66150, "PCM_16")
        clip = render.render_clip(entry["attributes"]["seed"], 1.5, 44100)
        assert entry["caption"] == clip.caption and entry["attributes"] == clip.attributes
        audio, _ = soundfile.read(str(tmp_path / entry["path"]), dtype="float32")
        assert np.max(np.abs(audio.T - clip.audio)) <= 1.0 / 32767
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["count"] == 3 and info["config"]["seed"] == 2 and info["license"] == "CC0-1.0"
    scanned = scan_folder(tmp_path)
    assert scanned.usable == 3 and not any(scanned.skipped.values()) and not scanned.unlisted
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"

    with config.unlocked():
        config.num_clips = 2
    assert writer.write_dataset(config, tmp_path)["stale_clips_removed"] == 1
    assert sorted(p.name for p in (tmp_path / "audio").iterdir()) == ["000000.wav", "000001.wav"]
    assert scan_folder(tmp_path).usable == 2 and not scan_folder(tmp_path).unlisted


def test_config_presets_and_checks(repo_root):
    path = f"{repo_root}/configs/synthetic_data.py"
    tiny = load_config(f"{path}:tiny")
    assert (tiny.num_clips, tiny.seconds, tiny.sample_rate) == (16, 4.0, 44100)
    default = load_config(path)
    assert (default.num_clips, default.seconds, default.seed, default.num_workers) == (500, 10.0, 0, 0)
    for override, key in (("bpm_min=300", "bpm_min"), ("instruments=('piano','kazoo')", "instruments"),
                          ("seconds=0.0", "seconds"), ("bpm_step=0", "bpm_step")):
        with pytest.raises(ValueError, match=key):
            writer.check_config(load_config(f"{path}:tiny", [override]))


def test_cli_writes_the_audio_folder(tmp_path, repo_root):
    result = subprocess.run(
        [sys.executable, "-m", "launch.prepare_data", "--config=configs/synthetic_data.py:tiny",
         f"--workdir={tmp_path}", "--config.num_clips=4"],
        cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 clips" in result.stdout
    assert sorted(p.name for p in (tmp_path / "audio").iterdir()) == [f"{i:06d}.wav" for i in range(4)]
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 4
    assert json.loads((tmp_path / "dataset_info.json").read_text())["count"] == 4

    bad = subprocess.run(
        [sys.executable, "-m", "launch.prepare_data", "--config=configs/synthetic_data.py:tiny",
         f"--workdir={tmp_path / 'bad'}", "--config.bpm_max=500"],
        cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "config.bpm_max=500" in bad.stderr and "Traceback" not in bad.stderr

"""Audio-folder validation: every bad kind of input is skipped under its reason, good files of any rate are kept."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import soundfile

from data_pipelines import audio_folder
from data_pipelines.audio_folder import SKIP_REASONS, data_root, scan_folder

LICENSE = "CC-BY-4.0"


def tone(rate: int, seconds: float, channels: int = 2, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * (220.0 + 110 * k) * t) for k in range(channels)], 1)


def entry(path, caption="a tune", license=LICENSE, **extra) -> dict:
    line = {"path": path, "caption": caption, "license": license, **extra}
    return {k: v for k, v in line.items() if v is not ...}


# Good files: name -> (rate, seconds, channels, format); durations are the closed-form hours below.
GOOD = {
    "good/stereo44.wav": (44100, 2.0, 2, "WAV"),
    "good/mono48.flac": (48000, 1.5, 1, "FLAC"),
    "good/quad22.wav": (22050, 1.2, 4, "WAV"),
    "good/vorbis.ogg": (44100, 1.5, 2, "OGG"),
    "good/song.mp3": (44100, 2.0, 2, "MP3"),
    "good/link_inside.wav": (44100, 1.0, 2, "WAV"),  # a symlink to targets/inside.wav, inside the root
}
EXPECTED_SKIPS = {
    "bad_manifest_line": 4, "missing_field": 2, "license_missing": 2, "license_not_allowed": 1,
    "path_escapes_root": 3, "duplicate_path": 1, "missing_file": 2, "empty_file": 1, "unreadable_audio": 1,
    "truncated": 2, "too_short": 1, "non_finite": 2, "silent": 2,
}


def build_mixed_folder(base: Path) -> Path:
    root = base / "root"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / "targets").mkdir()
    lines: list = []
    for name, (rate, seconds, channels, fmt) in GOOD.items():
        if name == "good/link_inside.wav":
            soundfile.write(root / "targets/inside.wav", tone(rate, seconds, channels), rate)
            os.symlink(root / "targets/inside.wav", root / name)
        else:
            soundfile.write(root / name, tone(rate, seconds, channels), rate, format=fmt)
        licence = "cc-by-4.0" if fmt == "OGG" else LICENSE
        lines.append(entry(name, license=licence, title="T", attributes={"bpm": 90}))

    def bad(name, data=None, subtype="PCM_16", rate=44100):
        if data is not None:
            soundfile.write(root / "bad" / name, data, rate, subtype=subtype)
        lines.append(entry("bad/" + name))

    (root / "bad/empty.wav").write_bytes(b"")
    bad("empty.wav")
    whole_wav = root / "bad/whole.wav"
    soundfile.write(whole_wav, tone(44100, 2.0), 44100)
    (root / "bad/trunc.wav").write_bytes(whole_wav.read_bytes()[: whole_wav.stat().st_size // 2])
    whole_wav.unlink()
    bad("trunc.wav")
    soundfile.write(root / "bad/whole.flac", tone(44100, 2.0), 44100)
    whole_flac = (root / "bad/whole.flac").read_bytes()
    (root / "bad/trunc.flac").write_bytes(whole_flac[: len(whole_flac) // 2])
    (root / "bad/whole.flac").unlink()
    bad("trunc.flac")
    (root / "bad/junk.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    bad("junk.wav")
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        data = tone(44100, 1.5)
        data[3000, 1] = value
        bad(name, data, subtype="FLOAT")
    bad("zeros.wav", np.zeros((44100 * 2, 2)))
    bad("quiet.wav", tone(44100, 2.0, amplitude=10 ** (-70 / 20)), subtype="FLOAT")  # -70 dBFS < -60
    bad("short.wav", tone(44100, 0.5))
    lines.append(entry("bad/nowhere.wav"))  # missing_file
    lines.append(entry("good"))  # a directory: missing_file
    lines.append("this line is not JSON")
    lines.append([1, 2])
    lines.append('{"path": "bad/half-json.wav"')  # JSON cut short
    lines.append(entry("good/stereo44.wav", attributes="fast"))  # attributes must be an object
    lines.append(entry("bad/nocaption.wav", caption=...))
    lines.append({"caption": "no path", "license": LICENSE})
    lines.append(entry("good/stereo44.wav", license=...))  # license_missing
    lines.append(entry("good/stereo44.wav", license=None))  # license_missing
    lines.append(entry("good/stereo44.wav", license="CC-BY-NC-4.0"))
    soundfile.write(base / "outside.wav", tone(44100, 2.0), 44100)
    os.symlink(base / "outside.wav", root / "escape_link.wav")
    lines += [entry("../outside.wav"), entry(str(base / "outside.wav")), entry("escape_link.wav")]
    lines.append(entry("good/stereo44.wav"))  # duplicate_path
    soundfile.write(root / "unlisted.wav", tone(44100, 1.0), 44100)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (root / "manifest.jsonl").write_text(text + "\n\n")
    return root


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    return build_mixed_folder(tmp_path_factory.mktemp("folder"))


def test_inspect_data_cli_reports_each_bad_file_under_its_reason(mixed_root, tmp_path, repo_root):
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.inspect_data", f"--config={repo_root / 'configs/audio_folder.py'}",
         f"--config.root={mixed_root}", f"--workdir={workdir}"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((workdir / "data_report.json").read_text())
    assert report["usable"] == len(GOOD)
    assert report["skipped"] == {reason: EXPECTED_SKIPS.get(reason, 0) for reason in SKIP_REASONS}
    hours = sum(seconds for _, seconds, _, _ in GOOD.values()) / 3600
    assert report["hours"] == pytest.approx(hours, abs=0.05 / 3600)  # MP3 frames may differ by a frame or so
    assert report["unlisted_audio_files"] == 1
    assert any(line.split() == ["usable", str(len(GOOD))] for line in proc.stdout.splitlines())
    by_path = {(s["path"], s["reason"]) for s in report["skipped_files"]}
    assert ("bad/trunc.wav", "truncated") in by_path and ("bad/junk.wav", "unreadable_audio") in by_path
    assert ("escape_link.wav", "path_escapes_root") in by_path


def test_scan_keeps_good_files_with_their_header_values(mixed_root):
    result = scan_folder(mixed_root)
    items = {item.relpath: item for item in result.items}
    assert set(items) == {"good/stereo44.wav", "good/mono48.flac", "good/quad22.wav", "good/vorbis.ogg",
                          "good/song.mp3", "targets/inside.wav"}
    for name, (rate, seconds, channels, _) in GOOD.items():
        item = items["targets/inside.wav" if name == "good/link_inside.wav" else name]
        assert (item.sample_rate, item.channels) == (rate, channels)
        assert item.duration == pytest.approx(seconds, abs=0.03)
        assert item.attributes == {"bpm": 90} and item.title == "T" and item.artist is None
        assert item.peak_db == pytest.approx(20 * np.log10(0.3), abs=0.5)
    assert items["good/vorbis.ogg"].license == "CC-BY-4.0"  # written "cc-by-4.0": SPDX ids ignore case
    assert sum(result.skipped.values()) == len(result.skipped_entries) == sum(EXPECTED_SKIPS.values())


def test_thresholds_change_the_verdicts(mixed_root):
    strict = scan_folder(mixed_root, min_seconds=1.8, silence_threshold_db=-80.0, license_allowlist=("CC0-1.0",))
    assert strict.usable == 0
    # every line that names a path and a caption now fails the licence check: 6 good, 9 bad files, 2 missing,
    # 3 escaping, 1 duplicate and the CC-BY-NC line
    assert strict.skipped["license_not_allowed"] == 6 + 9 + 2 + 3 + 1 + 1
    lenient = scan_folder(mixed_root, min_seconds=0.1, silence_threshold_db=-80.0)
    assert lenient.usable == len(GOOD) + 2  # short.wav and the -70 dBFS file become usable
    assert lenient.skipped["silent"] == 1 and lenient.skipped["too_short"] == 0


def test_rewritten_file_is_checked_again_and_each_skip_is_logged_once(tmp_path, caplog):
    root = tmp_path / "root"
    root.mkdir()
    soundfile.write(root / "a.wav", np.zeros((44100 * 2, 2)), 44100)
    (root / "manifest.jsonl").write_text(json.dumps(entry("a.wav")) + "\n")
    with caplog.at_level(logging.WARNING, logger=audio_folder.__name__):
        assert scan_folder(root).skipped["silent"] == 1
        assert scan_folder(root).skipped["silent"] == 1
    assert sum("silent" in record.getMessage() for record in caplog.records) == 1
    soundfile.write(root / "a.wav", tone(44100, 2.0), 44100)
    os.utime(root / "a.wav", ns=(1, 10**18))  # a new mtime even on coarse-clock file systems
    assert scan_folder(root).usable == 1


def test_missing_folder_or_manifest_is_a_one_line_data_error(tmp_path):
    from musicdiff.errors import DataError

    with pytest.raises(DataError, match="no such directory"):
        scan_folder(tmp_path / "absent")
    with pytest.raises(DataError, match="manifest.jsonl"):
        scan_folder(tmp_path)


def test_root_alias_wins_over_data_root():
    config = ml_collections.ConfigDict(dict(root="", data=dict(root="/data/a")))
    assert data_root(config) == Path("/data/a")
    config.root = "/data/b"
    assert data_root(config) == Path("/data/b")
    config.root = config.data.root = ""
    from musicdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="--config.root"):
        data_root(config)


def test_caption_filters_select_clips_and_count_the_rest(tmp_path):
    import soundfile as sf

    rng = np.random.default_rng(0)
    lines = []
    for index, caption in enumerate(["Marimba and bass", "piano trio", "organ with MARIMBA", "drums alone"]):
        sf.write(tmp_path / f"{index}.wav", 0.1 * rng.standard_normal(44100).astype(np.float32), 44100)
        lines.append(json.dumps({"path": f"{index}.wav", "caption": caption, "license": "CC0-1.0"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    chosen = scan_folder(tmp_path, caption_include=("marimba",))
    assert [item.caption for item in chosen.items] == ["Marimba and bass", "organ with MARIMBA"]
    assert chosen.skipped["caption_filtered"] == 2
    left = scan_folder(tmp_path, caption_exclude=("marimba", "drums"))
    assert [item.caption for item in left.items] == ["piano trio"] and left.skipped["caption_filtered"] == 3

"""TFDS ArrayRecord build of an audio folder and Grain reading, all without TensorFlow."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from data_pipelines.audio_folder import scan_folder
from data_pipelines.grain_pipeline import AudioFolderSource, training_dataset, window_dataset
from data_pipelines.tfds_audio_folder import build_array_record, open_tfds_source
from musicdiff.config import load_config
from musicdiff.errors import DataError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "audio_folder.py"
CLIPS = {"a.wav": (44100, 2.5, 2), "b.flac": (48000, 1.5, 1), "c.wav": (22050, 3.0, 4)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    lines = []
    for k, (name, (rate, seconds, channels)) in enumerate(CLIPS.items()):
        t = np.arange(int(rate * seconds)) / rate
        audio = np.stack([0.3 * np.sin(2 * np.pi * 200.0 * (k + c + 1) * t) for c in range(channels)], 1)
        soundfile.write(root / name, audio, rate)
        lines.append({"path": name, "caption": f"clip {name}", "license": "CC0-1.0", "attributes": {"k": k},
                      "artist": "someone"})
    (root / "silent.wav").write_bytes(b"")
    lines.append({"path": "silent.wav", "caption": "nothing", "license": "CC0-1.0"})
    lines.append({"path": "a.wav", "caption": "no licence"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory) -> Path:
    return build_array_record(folder, tmp_path_factory.mktemp("tfds"))


def test_tensorflow_is_neither_installed_nor_imported(built):
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


def test_build_writes_array_record_with_only_the_usable_clips(built):
    assert list(built.glob("*.array_record-*")), sorted(p.name for p in built.iterdir())
    source = open_tfds_source(built)
    assert len(source) == len(CLIPS)
    metadata = {entry["path"]: entry for entry in (source.metadata(i) for i in range(len(source)))}
    assert set(metadata) == set(CLIPS)
    assert metadata["b.flac"] == {"path": "b.flac", "caption": "clip b.flac", "license": "CC0-1.0", "title": "",
                                  "artist": "someone", "attributes": {"k": 1}}
    paths = [source.metadata(i)["path"] for i in range(len(source))]
    assert dict(zip(paths, source.clip_lengths())) == {
        name: (int(rate * seconds), rate) for name, (rate, seconds, _) in CLIPS.items()
    }


def test_tfds_records_feed_the_same_transforms_as_the_folder(folder, built):
    config = load_config(str(CONFIG), [f"root={folder}", "data.sample_size=32768", "data.read_threads=0",
                                       "data.batch_size=3"])
    from_folder = AudioFolderSource(scan_folder(folder).items)
    from_tfds = open_tfds_source(built)

    def windows(source):
        out = {}
        for window in window_dataset(source, config.data, process_index=0, process_count=1):
            out[(str(window["caption"]), int(window["offset"]))] = window
        return out

    folder_windows, tfds_windows = windows(from_folder), windows(from_tfds)
    assert folder_windows.keys() == tfds_windows.keys()
    for key, window in folder_windows.items():
        for field in ("audio", "padding_mask", "seconds_start", "seconds_total"):
            np.testing.assert_array_equal(window[field], tfds_windows[key][field])
    batch = next(iter(training_dataset(from_tfds, config.data, seed=0, process_index=0, process_count=1)))
    assert batch["audio"].shape == (3, 2, 32768)
    assert sorted(batch["caption"].tolist()) == sorted(f"clip {name}" for name in CLIPS)


def test_command_line_build_runs_without_tensorflow(folder, tmp_path, repo_root):
    probe = ("import runpy, sys; sys.argv = ['tfds_audio_folder', '--root', sys.argv[1], '--data_dir', sys.argv[2]]; "
             "runpy.run_module('data_pipelines.tfds_audio_folder', run_name='__main__'); "
             "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    proc = subprocess.run([sys.executable, "-c", probe, str(folder), str(tmp_path)], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dataset_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert len(open_tfds_source(dataset_dir)) == len(CLIPS)


def test_opening_an_unbuilt_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="build it first"):
        open_tfds_source(tmp_path)

"""Grain pipeline: crop/pad/mask/timing values by hand, determinism, process sharding, checkpoint/restore, windows."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile

from data_pipelines.audio_folder import scan
from data_pipelines.grain_pipeline import AudioFolderSource, training_dataset, window_dataset
from musicdiff.config import load_config
from musicdiff.errors import DataError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "audio_folder.py"
SAMPLE_SIZE = 32768  # 16 * 2048
RAMP_FRAMES = 5 * 44100


def ramp() -> np.ndarray:
    """Stereo ramp whose every sample names its position: left = 0.5 i / N, right = -left."""
    left = (0.5 * np.arange(RAMP_FRAMES) / RAMP_FRAMES).astype(np.float32)
    return np.stack([left, -left])


def sine(freq, rate, seconds):
    return (0.4 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    soundfile.write(root / "ramp.wav", ramp().T, 44100, subtype="FLOAT")
    soundfile.write(root / "short.wav", ramp()[:, :22050].T, 44100, subtype="FLOAT")  # 0.5 s < one example
    soundfile.write(root / "mono48.wav", sine(1000.0, 48000, 3.5), 48000, subtype="FLOAT")
    soundfile.write(root / "quad22.flac", np.stack([sine(300.0 * (k + 1), 22050, 2.0) for k in range(4)], 1), 22050)
    names = ["ramp.wav", "short.wav", "mono48.wav", "quad22.flac"]
    lines = [json.dumps({"path": n, "caption": f"caption of {n}", "license": "CC0-1.0"}) for n in names]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def make_config(root, *overrides):
    return load_config(str(CONFIG), [f"root={root}", f"data.sample_size={SAMPLE_SIZE}",
                                                  "data.min_seconds=0.25", "data.batch_size=2",
                                                  "data.read_threads=0", *overrides])


def folder_source(config):
    return AudioFolderSource(scan(config).items)


def take(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def examples(batches):
    for batch in batches:
        for row in range(len(batch["index"])):
            yield {key: value[row] for key, value in batch.items()}


def test_examples_have_the_hand_computed_crop_padding_and_timing(folder):
    config = make_config(folder)
    source = folder_source(config)
    names = {source[i]["caption"].removeprefix("caption of "): i for i in range(len(source))}
    batches = list(training_dataset(source, config.data, seed=3, process_index=0, process_count=1, num_epochs=1))
    assert len(batches) == 2
    assert batches[0]["audio"].shape == (2, 2, SAMPLE_SIZE) and batches[0]["audio"].dtype == np.float32
    assert batches[0]["caption"].dtype.kind == "U"
    seen = set()
    for example in examples(batches):
        index, offset = int(example["index"]), int(example["offset"])
        seen.add(index)
        assert example["seconds_start"].dtype == example["seconds_total"].dtype == np.float32
        assert example["seconds_start"] == math.floor(offset / 44100)
        if index == names["ramp.wav"]:
            assert 0 <= offset <= RAMP_FRAMES - SAMPLE_SIZE
            np.testing.assert_array_equal(example["audio"], ramp()[:, offset:offset + SAMPLE_SIZE])
            assert example["padding_mask"].sum() == SAMPLE_SIZE and example["seconds_total"] == 5
        elif index == names["short.wav"]:
            assert offset == 0 and example["seconds_total"] == 1  # ceil(0.5 s)
            np.testing.assert_array_equal(example["audio"][:, :22050], ramp()[:, :22050])
            assert not example["audio"][:, 22050:].any()
            np.testing.assert_array_equal(example["padding_mask"], np.r_[np.ones(22050), np.zeros(SAMPLE_SIZE - 22050)])
        elif index == names["mono48.wav"]:
            assert example["seconds_total"] == 4  # ceil(3.5 s)
            np.testing.assert_array_equal(example["audio"][0], example["audio"][1])  # mono duplicated
            # resampled 48 kHz -> 44.1 kHz: 1 kHz falls in FFT bin 1000 * 32768 / 44100 = 743.04
            assert np.argmax(np.abs(np.fft.rfft(example["audio"][0] * np.hanning(SAMPLE_SIZE)))) == 743
        else:
            assert example["seconds_total"] == 2 and example["padding_mask"].sum() == SAMPLE_SIZE
    assert seen == set(range(4))  # one epoch visits every clip once


def test_same_seeds_same_batches_other_seeds_other_crops_and_order(folder):
    config = make_config(folder)
    source = folder_source(config)
    build = lambda cfg, seed: training_dataset(source, cfg.data, seed=seed, process_index=0, process_count=1)
    reference = take(build(config, 0), 6)
    assert_batches_equal(reference, take(build(config, 0), 6))
    other_crops = take(build(config, 1), 6)
    assert [b["index"].tolist() for b in other_crops] == [b["index"].tolist() for b in reference]
    assert any((a["offset"] != b["offset"]).any() for a, b in zip(reference, other_crops))
    reshuffled = take(build(make_config(folder, "data.shuffle_seed=7"), 0), 6)
    assert [b["index"].tolist() for b in reshuffled] != [b["index"].tolist() for b in reference]


def test_process_shards_are_disjoint_equal_and_cover_the_epoch(folder):
    config = make_config(folder, "data.batch_size=1")
    source = folder_source(config)
    for count in (2, 3):
        shards = [
            [int(b["index"][0]) for b in training_dataset(source, config.data, seed=0, process_index=p,
                                                           process_count=count, num_epochs=1)]
            for p in range(count)
        ]
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat)) == len(source) // count * count
        assert len({len(shard) for shard in shards}) == 1


def test_restoring_the_iterator_state_replays_the_same_batches(folder):
    config = make_config(folder)
    source = folder_source(config)
    dataset = training_dataset(source, config.data, seed=5, process_index=0, process_count=1)
    iterator = iter(dataset)
    take_from = lambda it, n: [next(it) for _ in range(n)]
    take_from(iterator, 3)
    state = iterator.get_state()
    expected = take_from(iterator, 4)
    restored = iter(training_dataset(source, config.data, seed=5, process_index=0, process_count=1))
    restored.set_state(json.loads(json.dumps(state)))  # the state survives a round trip through JSON
    assert_batches_equal(expected, take_from(restored, 4))


def test_random_crop_off_takes_the_first_window(folder):
    config = make_config(folder, "data.random_crop=False", "data.batch_size=4")
    batch = take(training_dataset(folder_source(config), config.data, seed=0, process_index=0, process_count=1), 1)[0]
    assert not batch["offset"].any() and not batch["seconds_start"].any()


def test_peak_normalisation_uses_the_whole_file_peak(folder):
    config = make_config(folder, "data.normalize=peak", "data.random_crop=False", "data.batch_size=4")
    source = folder_source(config)
    batch = take(training_dataset(source, config.data, seed=0, process_index=0, process_count=1), 1)[0]
    row = [source[int(i)]["caption"] for i in batch["index"]].index("caption of ramp.wav")
    file_peak = 0.5 * (RAMP_FRAMES - 1) / RAMP_FRAMES
    expected = ramp()[:, :SAMPLE_SIZE] * (10 ** (-1 / 20) / file_peak)
    np.testing.assert_allclose(batch["audio"][row], expected, rtol=1e-5, atol=1e-7)


def test_windows_cover_every_clip_in_order(folder):
    config = make_config(folder)
    source = folder_source(config)
    windows = list(window_dataset(source, config.data, process_index=0, process_count=1))
    by_clip = {}
    for window in windows:
        by_clip.setdefault(source[int(window["index"])]["caption"].removeprefix("caption of "), []).append(window)
    # samples at 44.1 kHz: 220500 (ramp), 22050 (short), 3.5 s * 44100 = 154350 (mono48), 2 s * 44100 = 88200
    for name, total in {"ramp.wav": 220500, "short.wav": 22050, "mono48.wav": 154350, "quad22.flac": 88200}.items():
        clip = by_clip[name]
        assert len(clip) == -(-total // SAMPLE_SIZE)
        assert [int(w["offset"]) for w in clip] == [k * SAMPLE_SIZE for k in range(len(clip))]
        assert [float(w["seconds_start"]) for w in clip] == [math.floor(k * SAMPLE_SIZE / 44100) for k in
                                                            range(len(clip))]
        assert sum(float(w["padding_mask"].sum()) for w in clip) == total
    np.testing.assert_array_equal(np.concatenate([w["audio"] for w in by_clip["ramp.wav"]], 1)[:, :RAMP_FRAMES],
                                  ramp())
    halves = [list(window_dataset(source, config.data, process_index=p, process_count=2)) for p in (0, 1)]
    keys = [(int(w["index"]), int(w["offset"])) for half in halves for w in half]
    assert sorted(keys) == sorted((int(w["index"]), int(w["offset"])) for w in windows)


def test_empty_source_is_a_data_error(folder):
    config = make_config(folder)
    with pytest.raises(DataError, match="no usable clips"):
        training_dataset(AudioFolderSource([]), config.data, seed=0, process_index=0, process_count=1)

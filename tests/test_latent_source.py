"""Latent source: record codec, crops/padding/timing by hand on records whose values name their frame, posterior
noise statistics, text padding, iterator checkpoint/restore, process sharding, manifest errors."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines.latent_source import (MANIFEST_NAME, PLAN_NAME, FORMAT, VERSION, LatentRecords, decode_record,
                                          encode_record, evaluation_prompts, iterate_records, latent_training_dataset,
                                          read_manifest, shard_name)
from musicdiff.errors import DataError

CHANNELS, FRAMES, RATIO, RATE = 3, 16, 4, 8  # toy sizes: a frame is 4 samples, a second 8 samples
REAL_FRAMES = [16, 16, 12, 10, 9, 8, 5, 3, 16, 1]
TEXT_LENGTH, TEXT_WIDTH = 6, 4


def frame_values(record: int) -> np.ndarray:
    """mean[c, f] = 1000 record + 100 c + f: every latent value says which record and frame it came from."""
    return (1000.0 * record + 100.0 * np.arange(CHANNELS)[:, None] + np.arange(FRAMES)[None, :]).astype(np.float32)


def write_latents(directory, *, std: float = 0.0, text: str = "t5", shards: int = 2):
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(len(REAL_FRAMES) / shards)
    entries = []
    for shard in range(shards):
        name = shard_name(shard, shards)
        writer = ArrayRecordWriter(str(directory / name), "group_size:1")
        records = range(shard * per_shard, min(len(REAL_FRAMES), (shard + 1) * per_shard))
        for index in records:
            real = REAL_FRAMES[index]
            mean = frame_values(index) if std == 0 else np.zeros((CHANNELS, FRAMES), np.float32)
            fields = dict(latent_mean=mean, latent_std=np.full((CHANNELS, FRAMES), std, np.float32),
                          latent_mask=np.arange(FRAMES) < real, seconds_start=float(index * 8 // RATE),
                          seconds_total=100.0 + index, offset=index * 8, real_samples=real * RATIO,
                          clip_index=index // 2, window_index=index, caption=f"caption {index // 2}",
                          license="CC0-1.0", path=f"clip{index // 2}.wav", title="", artist="",
                          attributes=json.dumps({"clip": index // 2}))
            if text == "t5":
                fields["prompt_embeddings"] = np.full((1 + index % TEXT_LENGTH, TEXT_WIDTH), index + 0.5, np.float32)
            else:
                fields["prompt_input_ids"] = np.arange(TEXT_LENGTH, dtype=np.int32) + index
                fields["prompt_attention_mask"] = np.arange(TEXT_LENGTH) < 2
            writer.write(encode_record(fields))
        writer.close()
        entries.append({"file": name, "items": len(records)})
    text_section = ({"name": "t5", "id": "test", "config": {}, "max_length": TEXT_LENGTH, "embedding_dim": TEXT_WIDTH}
                    if text == "t5" else {"name": "embedded", "id": "test", "config": {}, "max_length": TEXT_LENGTH})
    manifest = {"format": FORMAT, "version": VERSION, "text_encoder": text_section, "sample_rate": RATE,
                "downsampling_ratio": RATIO, "latent_shape": [CHANNELS, FRAMES], "num_items": len(REAL_FRAMES),
                "shards": entries}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


def examples(batches):
    for batch in batches:
        for row in range(len(batch["caption"])):
            yield {key: value[row] for key, value in batch.items()}


def test_codec_round_trips_every_storable_dtype_without_pickle():
    fields = {"bf16": np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3), "f16": np.ones(3, np.float16),
              "i32": np.arange(4, dtype=np.int32), "mask": np.array([True, False]), "text": "caption é",
              "count": 7, "value": 0.25, "scalar": np.float32(1.5)}
    decoded = decode_record(encode_record(fields))
    for key in ("bf16", "f16", "i32", "mask"):
        assert decoded[key].dtype == fields[key].dtype
        np.testing.assert_array_equal(decoded[key], fields[key])
    assert (decoded["text"], decoded["count"], decoded["value"], decoded["scalar"]) == ("caption é", 7, 0.25, 1.5)
    assert encode_record(fields) == encode_record(dict(fields))  # deterministic bytes
    with pytest.raises(TypeError):
        encode_record({"objects": np.array([object()])})
    with pytest.raises(TypeError):
        encode_record({"complex": np.ones(2, np.complex64)})


def test_crops_stay_in_the_real_frames_and_move_seconds_start(tmp_path):
    directory = write_latents(tmp_path / "latents")
    length = 8
    batches = latent_training_dataset(directory, latent_length=length, batch_size=2, seed=1, shuffle_seed=2,
                                      process_index=0, process_count=1, num_epochs=3)
    starts: dict[int, set[int]] = {}
    for example in examples(batches):
        assert example["latents"].shape == (CHANNELS, length) and example["latents"].dtype == np.float32
        record, start = divmod(int(example["latents"][0, 0]), 1000)
        real = REAL_FRAMES[record]
        np.testing.assert_array_equal(example["latents"], frame_values(record)[:, start:start + length])
        assert 0 <= start <= max(0, real - length)
        np.testing.assert_array_equal(example["padding_mask"], (np.arange(length) + start < real).astype(np.float32))
        assert example["seconds_start"] == math.floor((record * 8 + start * RATIO) / RATE)
        assert example["seconds_total"] == 100 + record and example["caption"] == f"caption {record // 2}"
        starts.setdefault(record, set()).add(start)
    assert sorted(starts) == list(range(len(REAL_FRAMES)))
    assert len(starts[0]) > 1  # a 16-frame window is cropped at different places in different epochs


def test_short_windows_are_zero_padded_and_masked(tmp_path):
    directory = write_latents(tmp_path / "latents")
    batches = latent_training_dataset(directory, latent_length=20, batch_size=5, seed=0, shuffle_seed=0,
                                      process_index=0, process_count=1, num_epochs=1)
    for example in examples(batches):
        record = int(example["latents"][0, 0]) // 1000
        np.testing.assert_array_equal(example["latents"][:, :FRAMES], frame_values(record))
        np.testing.assert_array_equal(example["latents"][:, FRAMES:], 0.0)
        np.testing.assert_array_equal(example["padding_mask"], np.arange(20) < REAL_FRAMES[record])
        assert example["seconds_start"] == math.floor(record * 8 / RATE)


def test_latents_are_fresh_posterior_samples_each_epoch(tmp_path):
    directory = write_latents(tmp_path / "latents", std=2.0)
    make = lambda seed: latent_training_dataset(directory, latent_length=FRAMES, batch_size=10, seed=seed,
                                                shuffle_seed=0, process_index=0, process_count=1, num_epochs=20)
    batches = list(make(3))
    noise = np.concatenate([b["latents"].ravel() for b in batches]) / 2.0  # mean 0, std 2
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1.0) < 0.03  # 9600 draws: 3 sigma ~ 0.03
    assert not np.array_equal(batches[0]["latents"], batches[1]["latents"])
    for ours, again in zip(batches[:3], list(make(3))[:3]):
        np.testing.assert_array_equal(ours["latents"], again["latents"])
    assert not np.array_equal(batches[0]["latents"], next(iter(make(4)))["latents"])


def test_restored_iterator_yields_the_same_batches(tmp_path):
    directory = write_latents(tmp_path / "latents", std=1.0)
    dataset = latent_training_dataset(directory, latent_length=6, batch_size=3, seed=5, shuffle_seed=7,
                                      process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(5):  # into the second epoch
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(6)]
    restored = iter(dataset)
    restored.set_state(state)
    for ours, theirs in zip(expected, [next(restored) for _ in range(6)]):
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key])


def test_processes_get_disjoint_records_that_cover_the_epoch(tmp_path):
    directory = write_latents(tmp_path / "latents")
    seen = []
    for process in range(2):
        batches = latent_training_dataset(directory, latent_length=4, batch_size=1, seed=0, shuffle_seed=3,
                                          process_index=process, process_count=2, num_epochs=1)
        seen.append([int(e["latents"][0, 0]) // 1000 for e in examples(batches)])
    assert len(seen[0]) == len(seen[1]) == 5 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(REAL_FRAMES)))


def test_text_is_padded_to_the_encoder_length(tmp_path):
    t5 = next(examples(latent_training_dataset(write_latents(tmp_path / "t5"), latent_length=4, batch_size=10,
                                                seed=0, shuffle_seed=0, process_index=0, process_count=1)))
    record = int(t5["latents"][0, 0]) // 1000
    real = 1 + record % TEXT_LENGTH
    assert t5["prompt_embeddings"].shape == (TEXT_LENGTH, TEXT_WIDTH)
    np.testing.assert_array_equal(t5["prompt_embeddings"][:real], record + 0.5)
    np.testing.assert_array_equal(t5["prompt_embeddings"][real:], 0.0)
    np.testing.assert_array_equal(t5["prompt_mask"], np.arange(TEXT_LENGTH) < real)
    assert "prompt_input_ids" not in t5

    embedded = latent_training_dataset(write_latents(tmp_path / "embedded", text="embedded"), latent_length=4,
                                       batch_size=10, seed=0, shuffle_seed=0, process_index=0, process_count=1)
    batch = next(iter(embedded))
    assert batch["prompt_input_ids"].dtype == np.int32 and batch["prompt_input_ids"].shape == (10, TEXT_LENGTH)
    assert batch["prompt_attention_mask"].dtype == bool and "prompt_embeddings" not in batch
    assert batch["caption"].dtype.kind == "U"


def test_records_and_prompts_for_evaluation(tmp_path):
    directory = write_latents(tmp_path / "latents")
    records = list(iterate_records(directory))
    assert [r["window_index"] for r in records] == list(range(len(REAL_FRAMES)))
    assert records[3]["attributes"] == {"clip": 1} and "latent_mean" not in records[3]
    prompts = evaluation_prompts(directory)
    assert [p["caption"] for p in prompts] == [f"caption {k}" for k in range(5)]
    assert len(LatentRecords(directory)) == len(REAL_FRAMES)


def test_unfinished_or_missing_outputs_are_named(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / PLAN_NAME).write_text("{}")
    with pytest.raises(DataError, match="has not finished"):
        read_manifest(tmp_path)
    directory = write_latents(tmp_path / "latents")
    (directory / shard_name(1, 2)).unlink()
    with pytest.raises(DataError, match="shard files missing"):
        LatentRecords(directory)

"""Precompute stage: windows and values against the autoencoder run directly, kill-and-resume byte identity, no-op on a
finished output, refusal of another autoencoder, two JAX processes covering every window once, both text modes."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from flax import nnx

from data_pipelines.latent_source import LatentRecords, iterate_records, read_manifest
from musicdiff.errors import ConfigError
from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.inference.precompute import KILL_AFTER_ENV, precompute_latents
from musicdiff.models.text_encoder import TextTokenizer, load_text_encoder
from tests.precompute_fixtures import (CLIPS, EXPECTED_WINDOWS, RATE, REPO, SAMPLE_SIZE, cli_args, output_files,
                                       precompute_config, save_autoencoder, write_audio_folder)
from tests.process_fixtures import start_cluster, tail, wait_all

SUBPROCESS_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("precompute")
    checkpoint = save_autoencoder(base / "autoencoder")
    root = write_audio_folder(base / "folder")
    reference = base / "reference"
    summary = precompute_latents(precompute_config(checkpoint, root), reference)
    return dict(base=base, checkpoint=checkpoint, root=root, reference=reference, summary=summary)


def run_cli(args, env_extra=None, timeout=SUBPROCESS_TIMEOUT_S):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_windows_timing_and_posterior_match_the_autoencoder(setup, unsharded):
    manifest = read_manifest(setup["reference"])
    assert manifest["num_items"] == EXPECTED_WINDOWS == setup["summary"]["items"]
    assert manifest["latent_shape"] == [64, SAMPLE_SIZE // 256] and manifest["latent_rate"] == RATE / 256
    assert manifest["posterior"] and manifest["dtype"] == "float32"
    assert manifest["autoencoder"]["fingerprint"] == find_checkpoint(setup["checkpoint"]).fingerprint()
    assert [s["items"] for s in manifest["shards"]] == [16, 16, EXPECTED_WINDOWS - 32]
    for shard in manifest["shards"]:
        data = (setup["reference"] / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert manifest["source"]["skipped"]["too_short"] == 1 and manifest["source"]["skipped"]["license_missing"] == 1
    assert setup["summary"]["skipped_inputs"]["too_short"] == 1
    assert math.isclose(manifest["hours"], sum(n for n, _ in CLIPS.values()) / RATE / 3600)

    records = list(iterate_records(setup["reference"], arrays=True))
    assert [r["window_index"] for r in records] == list(range(EXPECTED_WINDOWS))
    model = load_model(find_checkpoint(setup["checkpoint"]), "autoencoder")
    names = list(CLIPS)
    for record in records:
        samples, caption = CLIPS[record["path"]]
        assert record["clip_index"] == names.index(record["path"]) and record["caption"] == caption
        assert record["attributes"] == {"clip": names.index(record["path"])}
        assert record["offset"] % SAMPLE_SIZE == 0 and record["license"] == "CC0-1.0"
        real = min(SAMPLE_SIZE, samples - record["offset"])
        assert record["real_samples"] == real
        assert record["seconds_start"] == math.floor(record["offset"] / RATE)
        assert record["seconds_total"] == math.ceil(samples / RATE)
        np.testing.assert_array_equal(record["latent_mask"], np.arange(32) < math.ceil(real / 256))
    # The stored posterior is the autoencoder's, computed directly on a few windows (first, clip end, last).
    chosen = (records[0], records[5], records[-1])
    windows = np.zeros((len(chosen), 2, SAMPLE_SIZE), np.float32)
    for row, record in enumerate(chosen):
        audio = soundfile.read(setup["root"] / record["path"], dtype="float32", always_2d=True)[0].T
        piece = audio[:, record["offset"]:record["offset"] + SAMPLE_SIZE]
        windows[row, :, : piece.shape[1]] = piece
    features = np.asarray(nnx.jit(lambda m, x: m.encode_features(x))(model, jnp.asarray(windows.transpose(0, 2, 1))))
    for record, row_features in zip(chosen, features):
        mean, scale = np.split(row_features, 2, axis=-1)
        np.testing.assert_allclose(record["latent_mean"], mean.T, atol=2e-5)
        np.testing.assert_allclose(record["latent_std"], np.logaddexp(0, scale.T) + 1e-4, atol=2e-5)
    tokenizer = TextTokenizer(manifest["text_encoder"]["tokenizer_path"], 32)
    tokens = tokenizer([records[0]["caption"]])
    np.testing.assert_array_equal(records[0]["prompt_input_ids"], tokens["input_ids"][0])
    np.testing.assert_array_equal(records[0]["prompt_attention_mask"], tokens["attention_mask"][0])
    assert manifest["text_encoder"]["vocab_size"] <= 1024 and manifest["text_encoder"]["max_length"] == 32


@pytest.mark.slow
def test_vanished_files_and_non_finite_latents_are_skipped_and_counted(setup, monkeypatch, capsys):
    """A file gone between the scan and its read, and windows whose latents are NaN, are skipped and counted."""
    from musicdiff.inference.precompute import stage

    root = shutil.copytree(setup["root"], setup["base"] / "vanishing")
    scan, encoder = stage.open_dataset, stage.WindowEncoder

    def scan_then_delete(config):
        dataset = scan(config)
        (root / "a.wav").unlink()  # its 6 windows (0-5) were laid out by the scan
        return dataset

    class FirstRowNaN(encoder):
        def __call__(self, audio, padding_mask):
            out = super().__call__(audio, padding_mask)
            return {**out, "latent_mean": out["latent_mean"].at[0].set(jnp.nan)}

    monkeypatch.setattr(stage, "open_dataset", scan_then_delete)
    monkeypatch.setattr(stage, "WindowEncoder", FirstRowNaN)
    workdir = setup["base"] / "skipping"
    summary = precompute_latents(precompute_config(setup["checkpoint"], root), workdir)
    # 6 batches of 8 (shards of 16, 16 and 11 windows); batch 0's first row is a.wav's, already unreadable.
    assert summary["skipped_windows"] == {"changed_since_scan": 6, "non_finite_latents": 5}
    assert "skipped windows: changed_since_scan=6, non_finite_latents=5" in capsys.readouterr().out
    manifest = read_manifest(workdir)
    assert manifest["num_items"] == EXPECTED_WINDOWS - 11 and manifest["skipped_windows"] == summary["skipped_windows"]
    records = list(iterate_records(workdir, arrays=True))
    assert len(records) == EXPECTED_WINDOWS - 11 and "a.wav" not in {r["path"] for r in records}
    assert all(np.isfinite(r["latent_mean"]).all() for r in records)
    assert {r["window_index"] for r in records}.isdisjoint({0, 1, 2, 3, 4, 5, 8, 16, 24, 32, 40})


def test_killed_run_resumes_to_byte_identical_files(setup):
    workdir = setup["base"] / "killed"
    killed = run_cli(cli_args(setup["checkpoint"], setup["root"], workdir), {KILL_AFTER_ENV: "21"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "window/s" in killed.stderr  # the progress bar
    assert (workdir / "shard-00000-of-00003.array_record").is_file()
    assert (workdir / "shard-00001-of-00003.array_record.partial").is_file()
    assert not (workdir / "manifest.json").exists()
    with pytest.raises(Exception, match="has not finished"):
        read_manifest(workdir)

    summary = precompute_latents(precompute_config(setup["checkpoint"], setup["root"]), workdir)
    assert summary["shards_skipped"] == 1 and summary["windows_encoded"] == EXPECTED_WINDOWS - 16
    assert output_files(workdir) == output_files(setup["reference"])


def test_finished_output_is_a_noop(setup, capsys):
    before = {p: p.stat().st_mtime_ns for p in setup["reference"].rglob("*")}
    summary = precompute_latents(precompute_config(setup["checkpoint"], setup["root"]), setup["reference"])
    assert summary["nothing_to_do"] and summary["windows_encoded"] == 0 and summary["items"] == EXPECTED_WINDOWS
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in setup["reference"].rglob("*")} == before
    copied = shutil.copytree(setup["checkpoint"], setup["base"] / "copied_autoencoder")  # the same checkpoint
    assert precompute_latents(precompute_config(copied, setup["root"]), setup["reference"])["nothing_to_do"]


def test_other_autoencoder_or_settings_are_refused_unless_overwrite(setup):
    workdir = setup["base"] / "replaced"
    shutil.copytree(setup["reference"], workdir)
    other = save_autoencoder(setup["base"] / "other_autoencoder", seed=1, step=7)
    with pytest.raises(ConfigError, match="fingerprint"):
        precompute_latents(precompute_config(other, setup["root"]), workdir)
    # Retrained at the same size and step: other weights, so another fingerprint.
    retrained = save_autoencoder(setup["base"] / "retrained_autoencoder", seed=2, step=0)
    assert find_checkpoint(retrained).fingerprint() != find_checkpoint(setup["checkpoint"]).fingerprint()
    with pytest.raises(ConfigError, match="fingerprint"):
        precompute_latents(precompute_config(retrained, setup["root"]), workdir)
    with pytest.raises(ConfigError, match="dtype"):
        precompute_latents(precompute_config(setup["checkpoint"], setup["root"], "dtype=bfloat16"), workdir)
    assert output_files(workdir) == output_files(setup["reference"])  # refusals leave the output alone

    precompute_latents(precompute_config(other, setup["root"], "overwrite=True", "dtype=bfloat16"), workdir)
    manifest = read_manifest(workdir)
    assert manifest["autoencoder"]["fingerprint"] == find_checkpoint(other).fingerprint()
    assert manifest["dtype"] == "bfloat16" and manifest["num_items"] == EXPECTED_WINDOWS
    record = LatentRecords(workdir)[0]
    assert record["latent_mean"].dtype.name == "bfloat16" and record["latent_std"].dtype.name == "bfloat16"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_cover_every_window_exactly_once(setup):
    workdir = setup["base"] / "two_processes"

    def command(process_id, address):
        return cli_args(setup["checkpoint"], setup["root"], workdir, "distributed.enabled=True",
                        f"distributed.coordinator_address={address}", "distributed.num_processes=2",
                        f"distributed.process_id={process_id}", "distributed.initialization_timeout_s=60")

    procs = start_cluster(command, processes=2, devices=4)
    outputs = wait_all(procs, SUBPROCESS_TIMEOUT_S)
    assert [proc.returncode for proc in procs] == [0, 0], tail(outputs)
    assert "process 0" in outputs[0] and "process 1" in outputs[1]

    records = list(iterate_records(workdir, arrays=True))
    windows = [(r["path"], r["offset"]) for r in records]
    assert len(windows) == len(set(windows)) == EXPECTED_WINDOWS
    reference = list(iterate_records(setup["reference"], arrays=True))
    assert windows == [(r["path"], r["offset"]) for r in reference]
    for ours, theirs in zip(records, reference):  # 4 devices per process instead of 8: same values
        np.testing.assert_allclose(ours["latent_mean"], theirs["latent_mean"], atol=1e-5)
    assert (workdir / "tokenizer" / "tokenizer.json").read_bytes() == \
        (setup["reference"] / "tokenizer" / "tokenizer.json").read_bytes()


def save_tiny_t5(torch, directory, captions):
    """A random 2-layer T5 encoder saved as Hugging Face does, with a caption tokenizer next to it."""
    import transformers

    from musicdiff.models.text_encoder import build_caption_tokenizer

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   feed_forward_proj="relu")
    transformers.T5EncoderModel(config).eval().save_pretrained(str(directory))
    build_caption_tokenizer(captions, directory, 512)
    return directory


def test_t5_mode_stores_each_captions_embeddings(setup, unsharded):
    torch = pytest.importorskip("torch")
    t5_dir = save_tiny_t5(torch, setup["base"] / "t5", [caption for _, caption in CLIPS.values()])
    workdir = setup["base"] / "t5_latents"
    # The sao preset's text section is t5-base; point it at the tiny checkpoint and give its sizes.
    text = [f"text_encoder.{key}={value}" for key, value in dict(
        path=t5_dir, max_length=16, vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4).items()]
    config = precompute_config(setup["checkpoint"], setup["root"], *text, "dtype=float32", preset="sao")
    precompute_latents(config, workdir)
    manifest = read_manifest(workdir)
    assert manifest["text_encoder"]["name"] == "t5" and manifest["text_encoder"]["embedding_dim"] == 32
    assert not (workdir / "tokenizer").exists()

    encoder, tokenizer = load_text_encoder(config.text_encoder, nnx.Rngs(0))
    captions = [caption for _, caption in CLIPS.values()]
    tokens = tokenizer(captions)
    expected, mask = jax.jit(lambda ids, m: nnx.merge(*nnx.split(encoder))(ids, m))(tokens["input_ids"],
                                                                                     tokens["attention_mask"])
    by_caption = {c: (np.asarray(expected[i]), np.asarray(mask[i])) for i, c in enumerate(captions)}
    for record in iterate_records(workdir, arrays=True):
        embeddings, valid = by_caption[record["caption"]]
        assert record["prompt_embeddings"].shape == (valid.sum(), 32)
        np.testing.assert_allclose(record["prompt_embeddings"], embeddings[valid], atol=1e-5)
        assert "prompt_input_ids" not in record


def test_training_batches_come_from_the_stage_output(setup):
    from data_pipelines.latent_source import latent_training_dataset

    batch = next(iter(latent_training_dataset(setup["reference"], latent_length=24, batch_size=4, seed=0,
                                              shuffle_seed=0, process_index=0, process_count=1)))
    assert batch["latents"].shape == (4, 64, 24) and batch["latents"].dtype == np.float32
    assert batch["padding_mask"].shape == (4, 24) and batch["seconds_total"].shape == (4,)
    assert batch["prompt_input_ids"].shape == (4, 32) and batch["prompt_input_ids"].dtype == np.int32
    assert batch["prompt_attention_mask"].dtype == bool and batch["caption"].dtype.kind == "U"
    assert set(batch["caption"]) <= {caption for _, caption in CLIPS.values()}


def test_tfds_build_gives_the_clips_of_the_folder(setup):
    from data_pipelines.tfds_audio_folder import build_array_record
    from musicdiff.inference.precompute import open_dataset

    built = build_array_record(setup["root"], setup["base"] / "tfds", min_seconds=0.5)
    folder = open_dataset(precompute_config(setup["checkpoint"], setup["root"]))
    tfds = open_dataset(precompute_config(setup["checkpoint"], built, "data.source=tfds"))
    by_path = lambda dataset: {clip["path"]: (clip, length) for clip, length in zip(dataset.clips, dataset.lengths)}
    assert by_path(tfds) == by_path(folder) and len(folder.clips) == len(CLIPS)
    assert tfds.report["kind"] == "tfds" and tfds.report["usable"] == len(CLIPS)

"""The autoencoder training stage and the evaluate CLI on a rendered embedded set: exact resume, checkpoints that
inference loads, the CLIs end to end (training with demos, then a reconstruction report) and clear errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile
from flax import nnx

from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.eval.autoencoder_eval import evaluate_autoencoder
from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.training.autoencoder_data import split_folder
from musicdiff.training.runner import train
from musicdiff.checkpoints import flatten_with_names
from musicdiff.metrics import read_metrics
from tests.autoencoder_fixtures import SMALL_MODEL, compilation_cache, render_folder, small_config

# Warm-up 0 in "adv" mode: generator and discriminator steps alternate from step 0. heldout_fraction 0.1 holds out
# audio/000000.wav of the 8 clips (SHA-256 of the path / 2^64 = 0.014).
def train_autoencoder(config, workdir, **kwargs):
    return train(config, workdir, default_trainer="autoencoder", **kwargs)


RUN = ("training.checkpoint_every=2", "training.log_every=1", "training.demo_every=0", "data.heldout_fraction=0.1",
       "data.read_threads=0")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return render_folder(tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with compilation_cache(tmp_path_factory.mktemp("jax_cache")) as directory:
        yield directory


def stage_config(folder, num_steps, *extra):
    return small_config(*RUN, f"data.root={folder}", f"training.num_steps={num_steps}", *extra)


def final_state(num_steps):
    captured = {}

    def keep(step, state):
        if step == num_steps:
            captured.update(flatten_with_names(jax.device_get(jax.tree.map(
                lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
                state)))[0])

    return keep, captured


@pytest.fixture(scope="module")
def uninterrupted(folder, cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    keep, state = final_state(4)
    result = train_autoencoder(stage_config(folder, 4), workdir, on_state=keep)
    assert result.step == 4 and not result.preempted
    return workdir, state


def test_split_keeps_held_out_clips_out_of_training(folder):
    train, heldout = split_folder(stage_config(folder, 1))
    assert [item.relpath for item in heldout] == ["audio/000000.wav"]
    assert len(train) == 7 and not {i.relpath for i in train} & {i.relpath for i in heldout}


def test_resume_continues_exactly_like_an_uninterrupted_run(folder, cache, uninterrupted, tmp_path):
    reference_dir, reference = uninterrupted
    assert train_autoencoder(stage_config(folder, 2), tmp_path).step == 2
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2]
    keep, resumed = final_state(4)
    result = train_autoencoder(stage_config(folder, 4), tmp_path, on_state=keep)
    assert result.step == 4
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)  # same programs, same batches: bit-exact
    expected = {r["step"]: r for r in read_metrics(reference_dir / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        for name in ("loss", "spectral", "kl", "discriminator_loss", "grad_norm"):
            assert got[step][name] == expected[step][name], (step, name)
    assert expected[3]["discriminator_step"] == 0.0 and expected[4]["discriminator_step"] == 1.0


def test_checkpoint_loads_for_inference_with_ema_weights(uninterrupted):
    workdir, state = uninterrupted
    ref = find_checkpoint(workdir)
    assert ref.step == 4 and ref.config.autoencoder.channels == 4  # the resolved config travels with the weights
    model = load_model(ref, "autoencoder")
    loaded, _ = flatten_with_names(nnx.state(model, nnx.Param))
    assert loaded
    for name, value in loaded.items():
        np.testing.assert_array_equal(np.asarray(value), state[f"ema/autoencoder/{name}"], err_msg=name)


def test_init_from_starts_a_new_run_from_the_source_ema(folder, cache, uninterrupted, tmp_path):
    source_dir, source = uninterrupted
    assert train_autoencoder(stage_config(folder, 0, f"init_from={source_dir}"), tmp_path).step == 0
    ref = find_checkpoint(tmp_path)
    raw, _ = flatten_with_names(nnx.state(load_model(ref, "autoencoder", prefer_ema=False), nnx.Param))
    for name, value in raw.items():
        np.testing.assert_array_equal(np.asarray(value), source[f"ema/autoencoder/{name}"], err_msg=name)
    discriminator, _ = flatten_with_names(nnx.state(load_model(ref, "discriminator"), nnx.Param))
    for name, value in discriminator.items():  # the source's discriminator is carried over too
        np.testing.assert_array_equal(np.asarray(value), source[f"params/discriminator/{name}"], err_msg=name)


def cli(module, *args, cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=900)


def test_cli_trains_with_demos_then_evaluate_writes_a_report(folder, cache, tmp_path):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    overrides = [f"--config.{o}" for o in (*SMALL_MODEL, *RUN)]
    overrides = [o for o in overrides if not o.startswith("--config.training.demo_every")]
    train = cli("launch.train_autoencoder", "--config=configs/autoencoder.py:tiny", f"--config.data.root={folder}",
                f"--workdir={run_dir}", "--config.training.num_steps=2", "--config.training.demo_every=2",
                "--config.training.demo_seconds=1.0", *overrides, cache_dir=cache)
    assert train.returncode == 0, train.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert (run_dir / "checkpoints" / "2" / "data_iter").is_dir()
    demo = run_dir / "demos"
    assert {p.name for p in (demo / "2").iterdir()} == {"reconstruction.wav", "reconstruction_ema.wav"}
    scores = json.loads((demo / "metrics.jsonl").read_text().splitlines()[-1])
    assert scores["clip"] == "audio/000000.wav" and np.isfinite(scores["demo/reconstruction_ema/mel_distance"])
    assert list((run_dir / "tensorboard").iterdir())

    evaluate = cli("launch.evaluate", "--config=configs/evaluate.py:autoencoder", f"--config.checkpoint={run_dir}",
                   f"--config.data.root={folder}", f"--workdir={eval_dir}", "--config.chunk_frames=64",
                   "--config.overlap_frames=16", "--config.write_audio=True", cache_dir=cache)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    # The reconstruction, indexed like a generations folder with its clip's caption (the "autoencoded" row).
    listed = json.loads((eval_dir / "reconstructions" / "generations.jsonl").read_text())
    manifest = next(e for e in map(json.loads, (folder / "manifest.jsonl").read_text().splitlines())
                    if e["path"] == "audio/000000.wav")  # the held-out clip
    assert listed["prompt"] == manifest["caption"] and listed["attributes"] == manifest["attributes"]
    assert soundfile.info(listed["path"]).duration == pytest.approx(1.5)
    report = json.loads((eval_dir / "report.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"stft_distance", "mel_distance", "si_sdr", "mrstft_distance"}
    assert all(m["count"] == 1 and np.isfinite(m["mean"]) for m in metrics.values())  # the one held-out clip
    assert "| mel_distance |" in (eval_dir / "report.md").read_text()
    per_clip = json.loads((eval_dir / "per_clip.json").read_text())
    assert [c["path"] for c in per_clip] == ["audio/000000.wav"]
    assert per_clip[0]["seconds"] == pytest.approx(1.5)
    assert any("step 2" in note and "ema weights" in note for note in report["notes"])


def test_bad_checkpoint_paths_are_one_line_config_errors(folder, tmp_path):
    config = load_config("configs/evaluate.py:autoencoder", [f"checkpoint={tmp_path / 'missing'}",
                                                             f"data.root={folder}"])
    with pytest.raises(ConfigError, match=r"config.checkpoint=.*missing: checkpoint .*no such directory"):
        evaluate_autoencoder(config, tmp_path / "out")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    config = load_config("configs/evaluate.py:autoencoder", [f"checkpoint={empty}", f"data.root={folder}"])
    with pytest.raises(ConfigError, match="holds no checkpoint steps"):
        evaluate_autoencoder(config, tmp_path / "out")
    result = cli("launch.evaluate", "--config=configs/evaluate.py:autoencoder",
                 f"--config.checkpoint={tmp_path / 'missing'}", f"--config.data.root={folder}",
                 f"--workdir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: config.checkpoint=")

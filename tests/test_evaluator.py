"""The embedded evaluator trains a few steps into a loadable checkpoint, and evaluate_generations /
evaluate_series run end to end on tiny rendered clips (copies of the reference must score FD ~ 0, noise worse)."""

import json
import shutil

import ml_collections
import numpy as np
import pytest

from data_pipelines.synthetic.writer import write_dataset
from musicdiff.audio.io import write_audio
from musicdiff.config import load_config
from musicdiff.eval.backbones.embedded import EmbeddedBackbone
from musicdiff.training.runner import train
from musicdiff.eval.generation_eval import evaluate_generations, evaluate_series
from musicdiff.checkpoints import find_checkpoint
from musicdiff.metrics import read_metrics

EVALUATE_CONFIG = "configs/evaluate.py"


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    config = ml_collections.ConfigDict(dict(num_clips=10, seconds=3.0, sample_rate=16000, seed=7, num_workers=1,
                                            bpm_min=70, bpm_max=160, instruments=("piano", "bass", "drums", "pad")))
    write_dataset(config, root)
    return root


@pytest.fixture(scope="module")
def evaluator_dir(synthetic_root, tmp_path_factory, devices):
    workdir = tmp_path_factory.mktemp("evaluator")
    config = load_config("configs/evaluator.py:tiny", [f"data.root={synthetic_root}"])
    summary = train(config, workdir, default_trainer="evaluator")
    return workdir, summary


def _write_generations(folder, entries, audios, rate):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (entry, audio) in enumerate(zip(entries, audios)):
        write_audio(folder / f"{index}.wav", audio, rate)
        lines.append(json.dumps(dict(prompt=entry["caption"], seed=index, sampler="dpmpp-3m-sde", steps=8,
                                     cfg_scale=7.0, seconds_total=3.0, wall_time=0.5 + index,
                                     attributes=entry["attributes"])))
    (folder / "generations.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def generation_folders(synthetic_root, tmp_path_factory):
    from musicdiff.audio.io import load_audio

    base = tmp_path_factory.mktemp("generations")
    entries = [json.loads(line) for line in (synthetic_root / "manifest.jsonl").read_text().splitlines()]
    copies = [load_audio(synthetic_root / e["path"], None, None) for e in entries]
    rng = np.random.default_rng(0)
    noise = [0.3 * rng.standard_normal(a.shape).astype(np.float32) for a in copies]
    _write_generations(base / "copies", entries, copies, 16000)
    _write_generations(base / "noise", entries, noise, 16000)
    return base


def eval_config(evaluator_dir, synthetic_root, generated, cache):
    return load_config(f"{EVALUATE_CONFIG}:embedded", [
        f"generated_dir={generated}", f"reference.audio_dir={synthetic_root}", f"reference.cache_dir={cache}",
        f"backbones.embedded.checkpoint={evaluator_dir}"])


def test_evaluator_trains_and_checkpoints(evaluator_dir):
    workdir, summary = evaluator_dir
    assert summary["step"] == 4 and summary["train_clips"] + summary["heldout_clips"] == 10
    records = read_metrics(workdir / "metrics.jsonl")
    assert records and all(np.isfinite(r["loss"]) for r in records)
    assert {"acc_key", "acc_mode", "acc_tempo", "acc_instruments"} <= set(records[-1])
    heldout = json.loads((workdir / "heldout_accuracy.json").read_text())
    assert 0.0 <= heldout["attr_key_acc"] <= 1.0 and heldout["clips"] == summary["heldout_clips"]
    ref = find_checkpoint(workdir)
    assert ref.step == 4 and ref.has_subtree("params/evaluator")
    backbone = EmbeddedBackbone.from_checkpoint(workdir)
    assert backbone.id == f"embedded-evaluator-{ref.fingerprint()[:12]}"
    analysis = backbone.analyze([np.zeros((1, 88000), np.float32)])[0]
    assert analysis.frames.shape == (3, 64)  # 3-s windows at 0 and 1.5 s, plus one ending at 5.5 s
    assert set(analysis.label_probs) == {"key", "mode", "tempo", "instruments"}
    assert analysis.label_probs["key"].shape == (12,) and analysis.label_probs["key"].sum() == pytest.approx(1.0)


def test_evaluate_generations_end_to_end(evaluator_dir, synthetic_root, generation_folders, tmp_path):
    workdir, _ = evaluator_dir
    cache = tmp_path / "cache"
    copies = evaluate_generations(eval_config(workdir, synthetic_root, generation_folders / "copies", cache),
                                  tmp_path / "copies")
    noise = evaluate_generations(eval_config(workdir, synthetic_root, generation_folders / "noise", cache),
                                 tmp_path / "noise")
    fd_copy, fd_noise = copies["metrics"]["fd_embedded"], noise["metrics"]["fd_embedded"]
    assert fd_copy["value"] <= 1e-6 * fd_noise["value"]  # the very clips of the reference
    assert fd_noise["value"] > 0.0 and fd_copy["backbone"].startswith("embedded-evaluator-")
    assert copies["metrics"]["kl_embedded"]["value"] < 1e-4 < noise["metrics"]["kl_embedded"]["value"]
    assert copies["metrics"]["kl_embedded"]["prompts"] == 10
    assert copies["metrics"]["inference_time"]["value"] == pytest.approx(np.mean(0.5 + np.arange(10)))
    assert copies["metrics"]["inference_time"]["realtime_factor"] == pytest.approx(30.0 / np.sum(0.5 + np.arange(10)))
    for name in ("tempo_acc", "tempo_acc_octave", "key_acc", "mode_acc", "attr_key_acc", "attr_instrument_f1"):
        assert 0.0 <= copies["metrics"][name]["value"] <= 1.0
    report = json.loads((tmp_path / "copies" / "report.json").read_text())
    assert report["metrics"]["fd_embedded"]["backbone"] == fd_copy["backbone"]
    assert "fd_embedded" in (tmp_path / "copies" / "report.md").read_text()
    assert len((tmp_path / "copies" / "per_clip.jsonl").read_text().splitlines()) == 10
    assert read_metrics(tmp_path / "copies" / "metrics.jsonl")[0]["eval/fd_embedded"] == fd_copy["value"]
    assert list((tmp_path / "copies" / "tensorboard").iterdir())
    assert len(list(cache.glob("*.npz"))) == 1  # the reference was analysed once and cached for the second run


def test_series_writes_the_metric_vs_step_plot(evaluator_dir, synthetic_root, generation_folders, tmp_path):
    workdir, _ = evaluator_dir
    config = eval_config(workdir, synthetic_root, "", tmp_path / "cache")
    series = evaluate_series(config, tmp_path / "series", {0: generation_folders / "noise",
                                                           100: generation_folders / "copies"})
    assert series[100]["fd_embedded"] < series[0]["fd_embedded"]
    assert (tmp_path / "series" / "series.png").stat().st_size > 1000
    assert set(json.loads((tmp_path / "series" / "series.json").read_text())) == {"0", "100"}
    assert (tmp_path / "series" / "step_100" / "report.json").is_file()


def test_mismatched_reference_stats_are_refused(evaluator_dir, synthetic_root, generation_folders, tmp_path):
    from musicdiff.errors import DataError
    from musicdiff.eval.frechet import EmbeddingStats

    workdir, _ = evaluator_dir
    other = EmbeddingStats.from_frames(np.random.default_rng(0).standard_normal((40, 64)),
                                       "openl3-mel256-music-512-44100hz-stereo-hop0.5")
    path = other.save(tmp_path / "openl3.npz")
    config = load_config(f"{EVALUATE_CONFIG}:embedded", [
        f"generated_dir={generation_folders / 'copies'}", f"reference.stats={path}",
        f"backbones.embedded.checkpoint={workdir}", "kl_backbone=", "prompt_following=false"])
    from musicdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="no reference for backbone 'embedded-evaluator-.*given files are of: openl3"):
        evaluate_generations(config, tmp_path / "out")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert DataError  # the npz-level refusal is tested in test_eval_metrics


def test_checkpoint_series_generates_per_step_then_plots(evaluator_dir, synthetic_root, generation_folders,
                                                         tmp_path):
    from musicdiff.eval.checkpoint_series import evaluate_checkpoints

    workdir, _ = evaluator_dir
    for step in (0, 100):
        (tmp_path / "run" / "checkpoints" / str(step)).mkdir(parents=True)
    calls = []

    def fake_generate(settings, folder):  # stands in for launch.generate: step 0 "generates" noise
        calls.append((settings.checkpoint, settings.prompts_file, settings.steps))
        source = generation_folders / ("noise" if settings.checkpoint.endswith("/0") else "copies")
        shutil.copytree(source, folder)

    config = load_config(f"{EVALUATE_CONFIG}:embedded", [
        f"checkpoints={tmp_path / 'run'}", f"reference.audio_dir={synthetic_root}", "num_prompts=4",
        f"reference.cache_dir={tmp_path / 'cache'}", f"backbones.embedded.checkpoint={workdir}"])
    series = evaluate_checkpoints(config, tmp_path / "out", generate=fake_generate)
    assert [c[0] for c in calls] == [str(tmp_path / "run" / "checkpoints" / s) for s in ("0", "100")]
    assert calls[0][1] == str(tmp_path / "out" / "prompts.jsonl") and calls[0][2] == config.generate.steps
    prompts = (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 4 and "attributes" in json.loads(prompts[0])
    assert series[100]["fd_embedded"] < series[0]["fd_embedded"]
    assert (tmp_path / "out" / "series.png").is_file()
    evaluate_checkpoints(config, tmp_path / "out", generate=fake_generate)  # rerun: folders exist, no generation
    assert len(calls) == 2


def test_evaluate_dispatches_on_kind(evaluator_dir, synthetic_root, generation_folders, tmp_path, capsys):
    from musicdiff.eval.stage import evaluate
    from musicdiff.errors import ConfigError

    workdir, _ = evaluator_dir
    config = eval_config(workdir, synthetic_root, generation_folders / "copies", tmp_path / "cache")
    evaluate(config, tmp_path / "out")
    assert "fd_embedded" in capsys.readouterr().out
    bad = ml_collections.ConfigDict(dict(kind="vocoder"))
    with pytest.raises(ConfigError, match="config.kind='vocoder': choose one of"):
        evaluate(bad, tmp_path / "bad")

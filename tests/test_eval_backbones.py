"""Backbone plumbing: missing packages or weights give one clear ConfigError, the worker process round trip, ids,
the SA preprocessing and windowing."""

import sys

import ml_collections
import numpy as np
import pytest

from musicdiff.errors import ConfigError
from musicdiff.eval.backbones import build_backbone
from musicdiff.audio.windows import cut_windows, window_starts
from musicdiff.eval.backbones.external import MissingBackbone
from musicdiff.eval.backbones.worker import WorkerEngine


def backbones_config(**overrides):
    c = ml_collections.ConfigDict(dict(
        embedded=dict(checkpoint=""),
        openl3=dict(weights="", python="", content_type="music", sample_rate=44100, channels=2, hop_seconds=0.5),
        passt=dict(weights="", python="", device="cpu"),
        clap=dict(weights="", roberta_dir="", python="", device="cpu", seed=0),
    ))
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    return c


class FakeEngine:
    """A stand-in engine for the worker round trip: frames = per-channel means, logits = first samples."""

    def __init__(self, scale: float):
        self.scale = scale

    def analyze(self, clips):
        return [{"frames": np.stack([clip.mean(axis=-1), clip.std(axis=-1)]) * self.scale,
                 "logits:toy": clip[:, :3]} for clip in clips]

    def embed_text(self, prompts):
        return np.array([[len(p), p.count("a")] for p in prompts], np.float64)


def test_missing_weights_name_the_file_and_the_docs():
    backbone = build_backbone("passt", backbones_config())
    with pytest.raises(ConfigError, match=r"config\.backbones\.passt\.weights is empty: download "
                                          r"passt-s-f128-p16-s10-ap\.476-swa\.pt \(see docs/evaluation\.md\)"):
        backbone.analyze([np.zeros((1, 32000), np.float32)])
    missing = build_backbone("openl3", backbones_config(openl3__weights="/nowhere/openl3_audio_mel256_music.h5"))
    with pytest.raises(ConfigError, match=r"/nowhere/openl3_audio_mel256_music\.h5: no such file"):
        missing.analyze([np.zeros((2, 44100), np.float32)])
    clap = build_backbone("clap", backbones_config())
    with pytest.raises(ConfigError, match="630k-audioset-fusion-best.pt"):
        clap.embed_text(["a prompt"])


def test_missing_package_names_the_package(tmp_path):
    weights = tmp_path / "openl3_audio_mel256_music.h5"
    weights.write_bytes(b"not really weights")
    backbone = build_backbone("openl3", backbones_config(openl3__weights=str(weights)))
    try:
        import openl3  # noqa: F401
        pytest.skip("openl3 is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"needs the Python package 'openl3'.*pip install openl3.*"
                                          r"config\.backbones\.openl3\.python"):
        backbone.analyze([np.zeros((2, 44100), np.float32)])


def test_missing_embedded_checkpoint_says_how_to_train_it(tmp_path):
    with pytest.raises(ConfigError, match="launch.train_evaluator"):
        build_backbone("embedded", backbones_config())
    with pytest.raises(ConfigError, match="no such directory"):
        build_backbone("embedded", backbones_config(embedded__checkpoint=str(tmp_path / "nothing")))


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="choose one of embedded, openl3, passt, clap"):
        build_backbone("vggish", backbones_config())


def test_backbone_ids_name_their_protocol():
    assert build_backbone("openl3", backbones_config()).id == "openl3-mel256-music-512-44100hz-stereo-hop0.5"
    assert build_backbone("openl3", backbones_config(openl3__channels=1)).id.endswith("-mono-hop0.5")
    passt = build_backbone("passt", backbones_config())
    assert passt.label_groups == ("audioset",) and passt.sample_rate == 32000
    clap = build_backbone("clap", backbones_config(clap__weights="/w/630k-audioset-fusion-best.pt"))
    assert clap.id == "laion-clap-630k-audioset-fusion-best-48000hz" and clap.has_text


def test_worker_process_round_trip():
    engine = WorkerEngine(sys.executable, "tests.test_eval_backbones:FakeEngine", dict(scale=2.0))
    clips = [np.arange(12, dtype=np.float32).reshape(2, 6), np.ones((2, 4), np.float32)]
    results = engine.analyze(clips)
    np.testing.assert_allclose(results[0]["frames"], FakeEngine(2.0).analyze(clips)[0]["frames"])
    np.testing.assert_array_equal(results[1]["logits:toy"], np.ones((2, 3)))
    np.testing.assert_array_equal(engine.embed_text(["banana", "cd"]), [[6, 3], [2, 0]])


def test_worker_reports_a_missing_backbone_with_its_message():
    engine = WorkerEngine(sys.executable, "musicdiff.eval.backbones.external:PaSSTEngine", dict(weights=""))
    with pytest.raises(MissingBackbone, match=r"weights is empty: download passt-s-f128"):
        engine.analyze([np.zeros((1, 100), np.float32)])
    with pytest.raises(MissingBackbone, match="no such interpreter"):
        WorkerEngine("/nowhere/bin/python", "x:Y", {})


def test_reference_backbone_through_a_worker_reports_config_errors():
    backbone = build_backbone("passt", backbones_config(passt__python=sys.executable))
    with pytest.raises(ConfigError, match="backbone 'passt': config.backbones.passt.weights is empty"):
        backbone.analyze([np.zeros((1, 32000), np.float32)])


def test_prepare_peak_normalises_resamples_and_mixes():
    backbone = build_backbone("passt", backbones_config())
    stereo = np.stack([np.sin(np.linspace(0, 200, 44100)), 0.5 * np.sin(np.linspace(0, 200, 44100))]) * 0.1
    prepared = backbone.prepare(stereo.astype(np.float32), 44100)
    assert prepared.shape == (1, 32000)
    assert 20 * np.log10(np.max(np.abs(prepared))) == pytest.approx(-1.0, abs=0.05)
    openl3 = build_backbone("openl3", backbones_config())
    mono = openl3.prepare(np.sin(np.linspace(0, 100, 48000))[None].astype(np.float32) * 0.2, 48000)
    assert mono.shape == (2, 44100)  # mono is "faked" to stereo, as stable-audio-metrics does
    np.testing.assert_array_equal(mono[0], mono[1])


def test_windows_cover_the_clip():
    assert window_starts(100, 40, 20) == [0, 20, 40, 60]
    assert window_starts(110, 40, 20) == [0, 20, 40, 60]  # 10 left: not more than hop / 2
    assert window_starts(112, 40, 20) == [0, 20, 40, 60, 72]  # 12 samples left > hop / 2: one more window
    assert window_starts(30, 40, 20) == [0]
    windows = cut_windows(np.ones((1, 30), np.float32), 40, 20)
    assert windows.shape == (1, 1, 40) and windows[0, 0, 30:].sum() == 0.0

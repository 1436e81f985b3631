"""Equal-length cropping, intervals in reports, and the table of reference rows beside checkpoint steps, end to end
on rendered clips with a small numpy backbone (band energies per window) standing in for the real ones."""

import json
import shutil
import zlib

import ml_collections
import numpy as np
import pytest

from data_pipelines.synthetic.writer import write_dataset
from musicdiff.audio.io import load_audio, write_audio
from musicdiff.config import load_config
from musicdiff.errors import ConfigError, DataError
from musicdiff.eval import generation_eval
from musicdiff.audio.windows import cut_windows
from musicdiff.eval.backbones.base import Backbone, ClipAnalysis
from musicdiff.eval.evaluation_table import evaluate_reference_rows, write_real_row
from musicdiff.eval.frechet import EmbeddingStats
from musicdiff.eval.generation_eval import evaluate_generations, evaluate_series

RATE = 16000
REFERENCE_SECONDS, GENERATED_SECONDS = 6.0, 2.0


class BandEnergyBackbone(Backbone):
    """Log energies of 4 frequency bands per 0.5-s window; records the length of every clip it analyses."""

    id = "test-band-energy"
    sample_rate = RATE
    window_seconds, hop_seconds = 0.5, 0.25
    label_groups = ("bands",)
    has_text = True
    model_config = dict(tempo_edges=[90.0, 120.0], instruments=["piano", "bass", "drums", "pad"])

    def __init__(self):
        self.analysed_lengths = []

    def analyze(self, clips):
        out = []
        for clip in clips:
            self.analysed_lengths.append(clip.shape[-1])
            windows = cut_windows(clip, int(self.window_seconds * RATE), int(self.hop_seconds * RATE))[:, 0]
            power = np.abs(np.fft.rfft(windows, axis=-1)) ** 2
            frames = np.log(np.stack([band.sum(axis=-1) for band in np.array_split(power, 4, axis=-1)], -1) + 1e-8)
            bands = np.exp(frames.mean(axis=0) - frames.mean(axis=0).max())
            out.append(ClipAnalysis(frames, dict(bands=bands / bands.sum()), frames.mean(axis=0),
                                    dict(key=0, mode="major", tempo=1, instruments=["piano"])))
        return out

    def embed_text(self, prompts):
        return np.stack([np.random.default_rng(zlib.crc32(p.encode())).standard_normal(4) for p in prompts])


@pytest.fixture()
def backbone(monkeypatch):
    fake = BandEnergyBackbone()
    monkeypatch.setattr(generation_eval, "build_backbone", lambda name, config: fake)
    return fake


@pytest.fixture(scope="module")
def reference_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    write_dataset(ml_collections.ConfigDict(dict(
        num_clips=8, seconds=REFERENCE_SECONDS, sample_rate=RATE, seed=3, num_workers=1, bpm_min=70, bpm_max=160,
        instruments=("piano", "bass", "drums", "pad"))), root)
    return root


def _write_set(folder, entries, audios):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (entry, audio) in enumerate(zip(entries, audios)):
        write_audio(folder / f"{index}.wav", audio, RATE)
        lines.append(json.dumps(dict(prompt=entry["caption"], attributes=entry["attributes"], wall_time=1.0 + index,
                                     seconds_total=GENERATED_SECONDS)))
    (folder / "generations.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def sets(reference_root, tmp_path_factory):
    """Generations of 2 s: the first 2 s of every reference clip ("copies"), and noise."""
    base = tmp_path_factory.mktemp("sets")
    entries = [json.loads(line) for line in (reference_root / "manifest.jsonl").read_text().splitlines()]
    length = int(GENERATED_SECONDS * RATE)
    copies = [load_audio(reference_root / e["path"], None, None)[:, :length] for e in entries]
    rng = np.random.default_rng(0)
    noise = [0.3 * rng.standard_normal(a.shape).astype(np.float32) for a in copies]
    return _write_set(base / "copies", entries, copies), _write_set(base / "noise", entries, noise)


def _config(reference_root, tmp_path, *overrides):
    return load_config("configs/evaluate.py:embedded", [
        f"reference.audio_dir={reference_root}", f"reference.cache_dir={tmp_path / 'cache'}", "clap_backbone=clap",
        "bootstrap.resamples=300", "bootstrap.fd_resamples=300", *overrides])


def test_generations_and_references_are_analysed_at_one_length(backbone, reference_root, sets, tmp_path):
    copies, _ = sets
    config = _config(reference_root, tmp_path, f"generated_dir={copies}", "prompt_following=false")
    result = evaluate_generations(config, tmp_path / "cropped")
    assert result["crop_seconds"] == pytest.approx(GENERATED_SECONDS)
    assert len(backbone.analysed_lengths) == 24  # 8 reference clips, 8 generations for FD/KL and 8 for CLAP
    assert set(backbone.analysed_lengths) == {int(GENERATED_SECONDS * RATE)}
    fd = result["metrics"]["fd_embedded"]
    assert fd["value"] < 1e-9  # the same audio once cropped from 6 s: the very frames of the reference
    report = json.loads((tmp_path / "cropped" / "report.json").read_text())
    assert report["crop_seconds"] == pytest.approx(GENERATED_SECONDS)
    assert report["bootstrap"]["resamples"] == 300
    for name in ("fd_embedded", "kl_embedded", "clap_score", "inference_time"):
        entry = report["metrics"][name]
        assert entry["lo"] <= entry["hi"] and np.isfinite(entry["value"])
    assert report["metrics"]["inference_time"]["lo"] >= 1.0 and report["metrics"]["inference_time"]["hi"] <= 8.0
    assert "| lo | hi |" in (tmp_path / "cropped" / "report.md").read_text()

    backbone.analysed_lengths.clear()
    whole = evaluate_generations(_config(reference_root, tmp_path, f"generated_dir={copies}", "crop_seconds=-1",
                                         "prompt_following=false"), tmp_path / "whole")
    assert set(backbone.analysed_lengths) == {int(GENERATED_SECONDS * RATE), int(REFERENCE_SECONDS * RATE)}
    assert whole["crop_seconds"] == 0.0 and whole["metrics"]["fd_embedded"]["value"] > 1e-3


def test_reference_statistics_are_cached_per_crop_length(backbone, reference_root, sets, tmp_path):
    copies, _ = sets
    for seconds in (1.0, 2.0, 1.0):
        evaluate_generations(_config(reference_root, tmp_path, f"generated_dir={copies}", f"crop_seconds={seconds}",
                                     "prompt_following=false", "kl_backbone=", "clap_backbone="),
                             tmp_path / f"crop_{seconds}")
    cached = sorted(EmbeddingStats.load(p).crop_seconds for p in (tmp_path / "cache").glob("*.npz"))
    assert cached == [1.0, 2.0]  # the third run found the 1-s statistics
    assert set(backbone.analysed_lengths) == {RATE, 2 * RATE}


def test_a_crop_longer_than_the_shortest_clip_is_refused(backbone, reference_root, sets, tmp_path):
    copies, _ = sets
    config = _config(reference_root, tmp_path, f"generated_dir={copies}", "crop_seconds=3")
    with pytest.raises(ConfigError, match=r"config.crop_seconds=3: longer than the shortest clip \(2 s"):
        evaluate_generations(config, tmp_path / "out")


def test_reference_rows_and_steps_form_one_table(backbone, reference_root, sets, tmp_path):
    copies, noise = sets
    config = _config(reference_root, tmp_path)
    real = write_real_row(config, tmp_path / "real")
    table = evaluate_reference_rows(config, tmp_path / "table", {"real": real, "step_0": noise},
                                    steps={100: copies})
    assert table.crop_seconds == pytest.approx(GENERATED_SECONDS)  # the real clips are 6 s, generations 2 s
    report = json.loads((tmp_path / "table" / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["real", "step_0", "step 100"]
    assert [row["step"] for row in report["rows"]] == [None, None, 100]
    for row in report["rows"]:
        assert {"fd_embedded", "kl_embedded", "clap_score", "key_acc", "tempo_acc", "attr_key_acc",
                "attr_instrument_f1"} <= set(row["metrics"])
        assert all(m["lo"] <= m["hi"] for m in row["metrics"].values())
    assert report["rows"][0]["metrics"]["fd_embedded"]["value"] < 1e-9  # real clips against themselves
    verdicts = report["verdicts"]
    assert verdicts["fd_embedded"] == dict(baseline="step_0", candidate="step 100", higher_is_better=False,
                                           verdict="improved")
    assert verdicts["kl_embedded"]["verdict"] == "improved"
    # the fake predicts the same attributes for every clip: copies and noise score alike
    assert verdicts["attr_key_acc"]["verdict"] == "no separable change"
    markdown = (tmp_path / "table" / "report.md").read_text()
    assert "| real (reference) | 8 |" in markdown and "fd_embedded (lower is better): step 100 vs step_0: improved" \
        in markdown
    assert json.loads((tmp_path / "table" / "series.json").read_text()).keys() == {"100"}
    assert (tmp_path / "table" / "series.png").stat().st_size > 1000
    assert (tmp_path / "table" / "rows" / "step_0" / "report.json").is_file()
    assert (tmp_path / "table" / "step_100" / "report.json").is_file()


def test_series_takes_its_reference_rows_from_the_config(backbone, reference_root, sets, tmp_path):
    copies, noise = sets
    config = _config(reference_root, tmp_path, "real_row=true", f"reference_rows=step_0={noise}",
                     "prompt_following=false")
    series = evaluate_series(config, tmp_path / "series", {0: noise, 100: copies})
    assert set(series) == {0, 100} and series[100]["fd_embedded"] < series[0]["fd_embedded"]
    report = json.loads((tmp_path / "series" / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["real", "step_0", "step 0", "step 100"]
    assert (tmp_path / "series" / "rows" / "real" / "generations.jsonl").is_file()
    bad = _config(reference_root, tmp_path, "reference_rows=step_0")
    with pytest.raises(ConfigError, match="not name=DIR"):
        evaluate_series(bad, tmp_path / "bad", {100: copies})


def test_the_real_row_is_the_prompt_clips_when_prompts_come_from_another_folder(backbone, reference_root, tmp_path):
    """Held-out prompts: the real row lists the first num_prompts clips of prompts_dir, not the reference, and KL
    pairs each clip with the prompt folder's clip of its caption (no reference clip has it)."""
    heldout = tmp_path / "heldout"
    shutil.copytree(reference_root, heldout)
    manifest = heldout / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({**entry, "caption": f"held out: {entry['caption']}"}) + "\n" for entry in
                                map(json.loads, manifest.read_text().splitlines())))
    config = _config(reference_root, tmp_path, f"prompts_dir={heldout}", "num_prompts=3")
    index = write_real_row(config, tmp_path / "real") / "generations.jsonl"
    listed = [json.loads(line) for line in index.read_text().splitlines()]
    entries = [json.loads(line) for line in (heldout / "manifest.jsonl").read_text().splitlines()][:3]
    assert [r["path"] for r in listed] == [str((heldout / e["path"]).resolve()) for e in entries]
    assert [r["prompt"] for r in listed] == [e["caption"] for e in entries]
    generated = ["generated_dir=" + str(tmp_path / "real"), "prompt_following=false", "clap_backbone="]
    paired = evaluate_generations(_config(reference_root, tmp_path, f"prompts_dir={heldout}", "num_prompts=3",
                                          *generated), tmp_path / "paired")
    assert paired["metrics"]["kl_embedded"]["value"] == pytest.approx(0.0, abs=1e-5)  # each clip against itself (eps)
    with pytest.raises(DataError, match="no generation pairs"):
        evaluate_generations(_config(reference_root, tmp_path, *generated), tmp_path / "unpaired")

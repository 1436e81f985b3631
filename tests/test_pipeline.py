"""The demo pipeline's pieces that need no training: stage commands, the loss summary and summary.md."""

import json
import sys

import pytest

from musicdiff.errors import DataError
from musicdiff.pipeline import loss_summary, run_stage, stage_command, summary_markdown


def test_stage_command_is_the_cli_invocation(tmp_path):
    command = stage_command("evaluate", "configs/evaluate.py:autoencoder", ["step=0"], tmp_path / "eval")
    assert command == [sys.executable, "-m", "launch.evaluate", "--config=configs/evaluate.py:autoencoder",
                       "--config.step=0", f"--workdir={tmp_path / 'eval'}"]


def test_run_stage_logs_output_and_names_a_failure(tmp_path):
    run_stage("ok", [sys.executable, "-c", "print('hello')"], tmp_path / "ok.log")
    assert (tmp_path / "ok.log").read_text() == "hello\n"
    with pytest.raises(DataError, match="demo stage 'bad' failed with exit code 3"):
        run_stage("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")


def test_loss_summary_and_markdown(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "loss": 2.0 if step <= 100 else 1.0}) + "\n"
                               for step in range(0, 301, 25)))
    loss = loss_summary(metrics)
    assert loss == {"first_steps_mean": 2.0, "last_steps_mean": 1.0, "window": 100, "final_step": 300}
    report = {"clips": 3, "step": 0, "metrics": {m: {"mean": 1.0} for m in
                                                   ("mel_distance", "stft_distance", "mrstft_distance", "si_sdr")}}
    final = {**report, "step": 500, "metrics": {m: {"mean": 0.5} for m in report["metrics"]}}
    summary = {"seconds": {"data": 60.0, "diffusion": 120.0}, "total_seconds": 180.0,
               "autoencoder": {"step_0": report, "final": final}, "diffusion_loss": loss,
               "evaluation": {
                   "crop_seconds": 1.4, "verdicts": {"tempo_acc": {"verdict": "improved"}},
                   "rows": [row("real", None, 0.9, 0.8, 1.0), row("autoencoded", None, 0.8, 0.7, 0.9),
                            row("step 0", 0, 0.1, 0.0, 0.3), row("step 1500", 1500, 0.6, 0.4, 0.8)]},
               "spectrogram_grid": str(tmp_path / "spectrograms.png")}
    text = summary_markdown(summary, tmp_path)
    assert "Total 3.0 min: data 60 s, diffusion 120 s" in text
    assert "| mel_distance | 1 | 0.5 | -50.0% |" in text and "| si_sdr | 1 | 0.5 | -0.50 dB |" in text
    assert ("| metric | real (reference) | autoencoded (reference) | step 0 | step 1500 | last step vs step 0 |"
            in text)
    assert "| tempo_acc | 0.9 [0.8, 1] | 0.8 [0.7, 0.9] | 0.1 [0, 0.3] | 0.6 [0.4, 0.8] | improved |" in text
    # the bars: 0.5 <= 1.385 met, SI-SDR 0.5 > 0 met, 0.8 < 0.9 x 0.9 = 0.81 not met, 0.6 >= 0.5 met, 0.6 < 0.8 x 0.9
    assert "| autoencoder mel distance | 0.5 | <= 1.39 | yes |" in text
    assert "| autoencoder SI-SDR (dB) | 0.5 | > 0 | yes |" in text
    assert "| reconstructions' tempo_acc | 0.8 | >= 0.9 x real = 0.81 | no |" in text
    assert "| step 1500 tempo_acc | 0.6 | >= 0.5 | yes |" in text and "key_acc |" not in text
    assert "| step 1500 tempo_acc (the long preset's bar) | 0.6 | >= 0.8 x real = 0.72 | no |" in text
    assert "cropped to its first 1.40 s" in text and "spectrograms.png" in text


def row(name, step, value, lo, hi):
    return {"name": name, "step": step, "clips": 16, "folder": "", "metrics": {"tempo_acc": dict(value=value, lo=lo,
                                                                                                  hi=hi)}}


def test_loss_summary_without_losses_says_which_setting(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "lr": 1e-3}) + "\n")
    with pytest.raises(DataError, match="training.log_every"):
        loss_summary(tmp_path / "metrics.jsonl")


def test_lora_story_needs_the_demo_and_resolves_every_folder(tmp_path):
    from configs import demo
    from musicdiff.pipeline import run_demo

    config = demo.get_config("lora")
    with pytest.raises(DataError, match="no data/ folder.*run `make demo`"):
        run_demo(config, tmp_path)
    # every {name} of its stages is one of its own stages or a demo folder it requires
    folders = {name: name for name in [s[0] for s in config.stages] + list(config.requires)}
    for _, _, _, overrides in config.stages:
        [o.format(**folders) for o in overrides]


def test_lora_story_summary(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from musicdiff.pipeline import finish_lora_story

    (tmp_path / "lora").mkdir()
    save_file({"model/a/lora_a": np.zeros((4, 8), np.float32), "model/a/lora_b": np.zeros((6, 4), np.float32)},
              str(tmp_path / "lora" / "adapter.safetensors"),
              metadata={"musicdiff_adapter": json.dumps({"kind": "lora", "rank": 4})})
    (tmp_path / "lora_evaluation").mkdir()
    rows = [{"name": name, "step": step, "clips": 8, "folder": "",
             "metrics": {"drums_recall": dict(value=v, lo=v - 0.1, hi=min(1.0, v + 0.1))}}
            for name, step, v in (("real", None, 1.0), ("step 0", 0, 0.1), ("step 400", 400, 0.9))]
    report = {"crop_seconds": 4.1, "verdicts": {"drums_recall": {"verdict": "improved"}}, "rows": rows}
    (tmp_path / "lora_evaluation" / "report.json").write_text(json.dumps(report))
    summary = finish_lora_story({"seconds": {"lora": 60.0}, "total_seconds": 60.0}, tmp_path, "drums")
    assert summary["adapter"]["stored_values"] == 4 * 8 + 6 * 4
    text = (tmp_path / "lora_summary.md").read_text()
    assert "rank 4 on the demo's clips with drums (56 values" in text
    assert "| drums_recall | 1 [0.9, 1] | 0.1 [0, 0.2] | 0.9 [0.8, 1] | improved |" in text

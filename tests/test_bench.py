"""The benchmark harness's own logic: analytic FLOP counts, the row summary arithmetic, and the reference worker's
JSON-lines protocol (the timings themselves live in bench/results, never in tests)."""

from __future__ import annotations

import io
import json
import types

import ml_collections
import pytest

from bench import flops
from bench.report import markdown_table, rerender, summarize_row, write_report


def small_autoencoder_section(**overrides) -> ml_collections.ConfigDict:
    values = dict(name="oobleck", sample_rate=44100, in_channels=2, out_channels=2, channels=4, c_mults=(1,),
                  strides=(2,), latent_dim=3, use_snake=True, antialias=False, final_tanh=False, dtype="float32",
                  remat=False, bottleneck=dict(type="vae"))
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def test_oobleck_flops_match_the_closed_form():
    """One block of width 4, stride 2: every conv of the layer lists of spec §1.3/§1.4, counted by hand."""
    model = flops.abstract_autoencoder(small_autoencoder_section())
    length = 64
    residual_units = 3 * (2 * length * 7 * 4 * 4 + 2 * length * 4 * 4)  # k7 dilated + k1, at the block's input rate
    encode = (2 * length * 7 * 2 * 4  # k7 in-conv 2 -> 4
              + residual_units
              + 2 * (length // 2) * 4 * 4 * 4  # strided k4 conv 4 -> 4, one output per 2 inputs
              + 2 * (length // 2) * 3 * 4 * 6)  # k3 out-conv 4 -> 2·latent_dim
    assert flops.oobleck_encode_flops(model, length) == encode
    assert flops.oobleck_encode_flops(model, length - 1, batch=3) == 3 * encode  # padded to the ratio

    frames = 32
    decode = (2 * frames * 7 * 3 * 4  # k7 in-conv latent 3 -> 4
              + 2 * frames * 4 * 4 * 4  # transposed k4 conv, per input step
              + 3 * (2 * (2 * frames) * 7 * 4 * 4 + 2 * (2 * frames) * 4 * 4)  # residual units at 2·frames
              + 2 * (2 * frames) * 7 * 4 * 2)  # k7 out-conv 4 -> 2, no bias
    assert flops.oobleck_decode_flops(model, frames) == decode


def test_sao_autoencoder_flops_per_second_of_audio():
    """The :sao VAE: ~2.5 MFLOP per input sample in the encoder (spec §1.3 shapes), the decoder the same order."""
    from bench.rows import autoencoder_section

    model = flops.abstract_autoencoder(autoencoder_section("sao"))
    per_sample = flops.oobleck_encode_flops(model, 2048 * 64) / (2048 * 64)
    assert 2.0e6 < per_sample < 3.0e6
    assert 0.5 < flops.oobleck_decode_flops(model, 64) / flops.oobleck_encode_flops(model, 2048 * 64) < 2.0


def test_same_decode_flops_match_the_closed_form():
    """:same_tiny (width 32, 2 decoder blocks, stride 4, chunks of 8 + 2 tokens, midpoint shift, differential) on 6
    latent frames: 30 tokens, the second block on one chunk more; every matmul counted by hand."""
    from bench.rows import autoencoder_section

    model = flops.abstract_autoencoder(autoencoder_section("same_tiny"))

    def block(tokens):  # to_qkv (q, k, q2, k2, v), to_out, two attention maps within 10-token chunks, sin/SiLU GLU
        return (2 * tokens * 32 * 5 * 32 + 2 * tokens * 32 * 32 + 2 * 4 * tokens * 10 * 32
                + 2 * tokens * 32 * 2 * 96 + 2 * tokens * 96 * 32)

    linear, mapping = 2 * 6 * 16 * 32, 2 * 3 * 32 * 32 * (6 * 4)  # latent -> width; k3 conv width -> 2·16 patches
    assert flops.same_decode_flops(model, 6) == linear + block(30) + block(40) + mapping
    assert flops.same_decode_flops(model, 5, batch=2) == 2 * flops.same_decode_flops(model, 6)  # padded to chunks


def test_sa3_lengths_follow_the_reference_generate():
    """30 s: (30 + 6) · 44100 samples -> 388 frames of 4096 (even: SAME-S's chunk alignment), 323 + 64 valid."""
    from bench.rows import sa3_frames

    assert sa3_frames(30.0, 4096, 2) == (388, 387)
    assert sa3_frames(5.0, 4096, 2) == (120, 118)
    assert sa3_frames(120.0, 4096, 2) == (1358, 1356)  # above generate's default sample_size cap (1292), not applied


def _row(**fields):
    values = dict(name="sample_x", title="x", unit="steps", units_per_run=4, shapes={}, notes="", flops_per_run=8e9,
                  extrapolate_steps=100, efficiency_basis="flops")
    values.update(fields)
    return types.SimpleNamespace(**values)


def _measured(ours: float, ref: float) -> dict:
    side = lambda s: dict(runs_seconds=[s], median_seconds=s, warmup_seconds=s, compile_seconds=1.0,
                          setup_seconds=0.0)
    return dict(musicdiff=side(ours), reference=side(ref), load_average=dict(before=(1, 1, 1), after=(2, 2, 2)))


def test_summary_ratio_efficiency_and_extrapolation():
    summary = summarize_row(_row(), _measured(2.0, 5.0), peak=1e10)
    assert summary["ratio"] == pytest.approx(2.5)  # (4/2) / (4/5)
    assert summary["musicdiff"]["efficiency"] == pytest.approx(8e9 / 2.0 / 1e10)
    assert summary["reference"]["efficiency"] == pytest.approx(8e9 / 5.0 / 1e10)
    assert summary["musicdiff"]["seconds_per_step"] == pytest.approx(0.5)
    assert summary["musicdiff"]["extrapolated_latency_seconds"] == pytest.approx(50.0)
    assert "target_ratio" not in summary


def test_summary_target_and_decode_ceiling():
    row = _row(name="ae_encode", unit="s audio", extrapolate_steps=0)
    summary = summarize_row(row, _measured(4.0, 4.0), peak=1e10)
    assert summary["target_ratio"] == 2.0 and not summary["meets_target"]
    pipeline = _row(name="grain_pipeline", unit="clips", units_per_run=100, flops_per_run=None, extrapolate_steps=0,
                    efficiency_basis="decode_ceiling")
    measured = {**_measured(1.0, 2.0), "decode_ceiling_clips_per_second": 400.0}
    summary = summarize_row(pipeline, measured, peak=1e10)
    assert summary["musicdiff"]["efficiency"] == pytest.approx(100 / 400)
    assert summary["ratio"] == pytest.approx(2.0)


def test_markdown_lists_every_row_and_failures():
    rows = [summarize_row(_row(), _measured(2.0, 5.0), 1e10),
            summarize_row(_row(title="broken"), {"error": "boom\ntrace"}, 1e10)]
    report = dict(machine=dict(host="h", cpu="c", cores_used=2, jax="0", reference=dict(torch="t")), date="2026-01-01",
                  peak_flops_per_second=1e10, repeats=5, load_average_range=[1.0, 2.0], quick=False, rows=rows,
                  accelerator="not run")
    text = markdown_table(report)
    assert "| x | 0.50 s/step (50 s total) | 1.25 s/step (125 s total) | 2.50× |" in text
    assert "| broken | failed: boom |" in text


def test_rerender_replaces_analysis_and_conditions_but_not_numbers(tmp_path):
    rows = [summarize_row(_row(name="ae_encode", extrapolate_steps=0), _measured(2.0, 5.0), 1e10)]
    rows[0]["analysis"] = "stale text"
    report = dict(machine=dict(host="h", cpu="c", cores_used=2, jax="0", reference=dict(torch="t")), date="2026-01-01",
                  peak_flops_per_second=1e10, repeats=5, load_average_range=[1.0, 2.0], quick=False, rows=rows,
                  accelerator="not run")
    path = tmp_path / "h-2026-01-01.json"
    path.write_text(json.dumps(report))
    md_path = rerender(path, conditions="a demo ran alongside.", analysis={"ae_encode": "fresh text"})
    text = md_path.read_text()
    assert "Analysis: fresh text" in text and "stale text" not in text
    assert "Conditions of this run: a demo ran alongside." in text
    again = json.loads(path.read_text())
    assert again["rows"][0]["ratio"] == pytest.approx(2.5) and again["rows"][0]["analysis"] == "fresh text"
    assert again["conditions"] == "a demo ran alongside."


def test_a_second_run_of_the_day_keeps_the_first(tmp_path):
    report = dict(machine=dict(host="h", cpu="c", cores_used=2, jax="0", reference=dict(torch="t")), date="2026-01-01",
                  repeats=5, quick=False, peak_measurements=[{"jax": 1e10, "torch": 2e10}])
    measured = [(_row(), _measured(2.0, 5.0))]
    first, _ = write_report(dict(report), measured, tmp_path)
    second, second_md = write_report(dict(report), measured, tmp_path)
    assert first != second and second.stem == first.stem + "-2" and second_md.suffix == ".md"
    assert first.exists() and second.exists()


def test_reference_worker_protocol():
    """JSON in, JSON out; a failing request answers ok=false with the traceback and the worker keeps serving."""
    reference_side = pytest.importorskip("bench.reference_side")
    requests = io.StringIO("\n".join(json.dumps(r) for r in (
        {"op": "peak", "size": 64, "repeats": 1}, {"op": "nope"}, {"op": "setup", "row": "missing", "params": {}},
        {"op": "quit"})) + "\n")
    replies = io.StringIO()
    reference_side.serve(requests, replies)
    answers = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert answers[0]["ok"] and answers[0]["flops_per_second"] > 0
    assert not answers[1]["ok"] and "unknown op" in answers[1]["error"]
    assert not answers[2]["ok"] and "KeyError" in answers[2]["error"]
    assert answers[3] == {"ok": True}


@pytest.mark.slow
def test_accelerator_mode_smoke(tmp_path, repo_root):
    """`python -m bench.accelerator --smoke` runs every accelerator row on tiny configs and writes its report."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bench.accelerator", "--smoke", "--repeats=1", f"--out={tmp_path}"],
                            cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = tmp_path.glob("accelerator-*-smoke.json")
    data = json.loads(report.read_text())
    for row in ("dit_train_sao", "decode_sao", "generate_sao_small_pingpong_8", "generate_sao_dpmpp3msde_100",
                "generate_sa3_small_pingpong_8"):
        assert row in data
    assert data["dit_train_sao"]["step_seconds"] > 0 and data["smoke"]

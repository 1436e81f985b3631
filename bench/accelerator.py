"""`make bench-gpu`: the accelerator rows on one GPU or TPU device (bf16 DiT compute, fp32 parameters).

    python -m bench.accelerator [--peak_tflops=989] [--train_batch=16] [--repeats=5] [--attention=auto]
    python -m bench.accelerator --smoke     # tiny shapes on any backend: checks the code paths, not a result

Rows (musicdiff only; the reference has no accelerator here to compare with):
1. :sao DiT training step (configs/diffusion.py:sao: bf16 compute, every block rematerialised, AdamW) on
   `--train_batch` clips of 1024 latent frames with precomputed conditioning (130 tokens): steps/s and MFU =
   musicdiff.models.dit.dit_train_flops / step time / the device's peak (`--peak_tflops`, else the table below
   by device kind; remat recompute is not counted, so this is MFU, not HFU).
2. Text-to-audio latency for one 47.55 s clip, decode included: 100-step DPM++ 3M SDE with CFG 7 at :sao shapes,
   and 8-step ping-pong (cfg 1) with the :sao_small DiT; each = make_sampler's one jit (conditioning + loop) then
   the chunked :sao decoder, timed end to end after warm-up.
3. :sao autoencoder decode of the 47.55 s window (1024 latent frames, chunked as Generator decodes).
4. Stable Audio 3 small, 30 s text-to-audio (bench/rows.py `sa3_generation`, the CPU row's program): 8 ping-pong
   steps (cfg 1) of the :sa3_small DiT in bf16 over 388 latent frames (30 s + the reference's 6 s headroom) with the
   padding mask, 256 precomputed T5Gemma-shaped prompt tokens (T5Gemma not run), then the unchunked SAME-S decode
   (fp32, as its config); one compiled program, timed end to end after warm-up, next to the published SA3-small
   30 s numbers on an H200 (stable_audio_3.md §10: 0.46 s PyTorch, 0.022 s TensorRT; their methodology is not
   published, and the TensorRT one includes T5Gemma).
Targets (issue 11): ≥50% MFU on H100 for row 1; under 0.3 s (8 steps) and 2.5 s (100 steps) for row 2.
Writes bench/results/accelerator-<device>-<host>-<date>.json and .md.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import re
import socket
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from bench import ours
from bench.rows import SA3_PROMPT_TOKENS, SA3_STEPS, diffusion_config, sa3_generation, sa3_generation_flops
from musicdiff.config import load_config
from musicdiff.files import atomic_write_bytes, atomic_write_json
from musicdiff.inference.generate import SAO_SIGMA_MAX, SAO_SIGMA_MIN, SamplerSettings
from musicdiff.models import registry
from musicdiff.models.chunking import chunked_decode
from musicdiff.parallel.sharding import unsharded
from musicdiff.models.dit import dit_train_flops

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

# Dense bf16 peak FLOP/s per device (vendor data sheets), matched against jax's device_kind in order.
PEAK_BF16 = (
    (r"H100 PCIe", 756e12), (r"H100|H200|GH200", 989e12), (r"A100", 312e12), (r"L40S", 362e12), (r"L4\b", 121e12),
    (r"A10G|A10\b", 125e12), (r"TPU v6|TPU v6 lite|v6e", 918e12), (r"TPU v5p", 459e12),
    (r"TPU v5 lite|TPU v5e|v5litepod", 197e12), (r"TPU v4", 275e12),
)
TARGETS = {"dit_train_sao_mfu": 0.50, "generate_sao_small_pingpong_8_seconds": 0.3,
           "generate_sao_dpmpp3msde_100_seconds": 2.5}
CLIP_FRAMES = 1024
# Stable Audio 3's README (stable_audio_3.md §10): small, 30 s, on an H200.
SA3_PUBLISHED_H200_SECONDS = {"pytorch": 0.46, "tensorrt": 0.022}

SMOKE = flags.DEFINE_bool("smoke", False, "tiny configs and 2 sampler steps: a check of the code, not a result")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "device peak bf16 TFLOP/s (0: look up the device kind)")
TRAIN_BATCH = flags.DEFINE_integer("train_batch", 16, "clips per training step")
REPEATS = flags.DEFINE_integer("repeats", 5, "measured runs per row after warm-up")
ATTENTION = flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"],
                              "self-attention implementation; auto: cudnn on GPU (falling back to xla if it does not "
                              "compile), xla elsewhere")
OUT = flags.DEFINE_string("out", str(RESULTS), "folder for the results")


def device_peak(device: jax.Device) -> tuple[float, str]:
    if PEAK_TFLOPS.value > 0:
        return PEAK_TFLOPS.value * 1e12, "--peak_tflops"
    for pattern, peak in PEAK_BF16:
        if re.search(pattern, device.device_kind):
            return peak, f"table ({pattern})"
    return 0.0, "unknown device kind: pass --peak_tflops for MFU"


def _median_seconds(run, repeats: int) -> tuple[float, list[float]]:
    run()  # warm-up after compilation
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times), times


def _config(preset: str, attention: str):
    config = diffusion_config(preset)
    if SMOKE.value:
        return config  # the tiny preset in fp32
    config.model.dtype = "bfloat16"
    config.model.attention_implementation = attention
    return config


def _with_attention_fallback(build, preset: str, attention_choice: str, make_config=_config):
    """build(make_config(preset, attention)) with cudnn self-attention on GPU when asked (or auto), else / on failure
    with xla."""
    wants_cudnn = attention_choice == "cudnn" or (attention_choice == "auto" and jax.default_backend() == "gpu")
    if wants_cudnn and not SMOKE.value:
        try:
            return build(make_config(preset, "cudnn")), "cudnn"
        except Exception as error:  # unsupported shape/dtype for cuDNN flash attention: report and use XLA
            if attention_choice == "cudnn":
                raise
            print(f"cudnn attention failed for {preset} ({type(error).__name__}: {str(error)[:200]}); using xla")
    return build(make_config(preset, "xla")), "xla"


def train_row(peak: float) -> dict:
    preset = "tiny" if SMOKE.value else "sao"
    batch = 2 if SMOKE.value else TRAIN_BATCH.value
    length = 32 if SMOKE.value else CLIP_FRAMES
    tokens = 34 if SMOKE.value else 130

    def build(config):
        return ours.DiTTrainStep(config, batch, length, tokens, 20, 1), config

    (step, config), attention = _with_attention_fallback(build, preset, ATTENTION.value)
    median, times = _median_seconds(step.run, REPEATS.value)
    train_flops = dit_train_flops(config.model, batch, length, tokens)
    out = dict(preset=preset, batch=batch, latent_frames=length, cond_tokens=tokens, dtype=config.model.dtype,
               remat=config.model.remat, attention=attention, compile_seconds=step.compile_seconds,
               step_seconds=median, runs_seconds=times, steps_per_second=1 / median,
               clips_per_second=batch / median, train_flops_per_step=train_flops,
               achieved_flops_per_second=train_flops / median)
    if peak:
        out["mfu"] = train_flops / median / peak
    return out


def _decoder(frames: int):
    preset = "tiny" if SMOKE.value else "sao"
    section = load_config(str(REPO / "configs" / "autoencoder.py") + f":{preset}").autoencoder
    model = registry.build(section, nnx.Rngs(0))
    latents = jax.random.normal(jax.random.key(7), (1, int(section.latent_dim), frames))
    began = time.perf_counter()
    jax.block_until_ready(chunked_decode(model, latents))
    return model, latents, time.perf_counter() - began


def decode_row() -> dict:
    frames = 32 if SMOKE.value else CLIP_FRAMES
    model, latents, compile_seconds = _decoder(frames)
    median, times = _median_seconds(lambda: jax.block_until_ready(chunked_decode(model, latents)), REPEATS.value)
    seconds = frames * model.downsampling_ratio / model.config.sample_rate
    return dict(latent_frames=frames, audio_seconds=seconds, dtype=model.config.dtype,
                first_call_seconds=compile_seconds, decode_seconds=median, runs_seconds=times,
                audio_seconds_per_second=seconds / median)


def generation_row(preset: str, decoder) -> dict:
    model, _, _ = decoder
    steps_total = 2 if SMOKE.value else (100 if preset == "sao" else 8)
    length = 32 if SMOKE.value else CLIP_FRAMES
    if preset == "sao":
        settings = SamplerSettings(sampler="dpmpp-3m-sde", steps=steps_total, cfg_scale=7.0, sigma_min=SAO_SIGMA_MIN,
                                   sigma_max=SAO_SIGMA_MAX, rho=1.0)
        prompt_tokens = 128
    else:
        settings = SamplerSettings(sampler="pingpong", steps=steps_total, cfg_scale=1.0, sigma_max=1.0)
        prompt_tokens = 64
    config_preset = "tiny" if SMOKE.value else preset
    if SMOKE.value:
        prompt_tokens = 32

    def build(config):
        if SMOKE.value:  # the tiny DiT takes 32-d tokens from its embedded encoder; feed them as precomputed ones
            config.conditioner.conditioning.configs[0] = dict(id="prompt", type="t5",
                                                              config=dict(t5_model_name="t5-base", dim=32))
        return ours.Sampling(config, settings, 1, length, prompt_tokens, 20, prompt_dim=32 if SMOKE.value else 768)

    sampler, attention = _with_attention_fallback(build, config_preset, ATTENTION.value)

    def generate():
        latents = sampler.sample(sampler.params, sampler.inputs, sampler.key)
        jax.block_until_ready(chunked_decode(model, latents.astype(jnp.float32)))

    median, times = _median_seconds(generate, REPEATS.value)
    sample_median, _ = _median_seconds(sampler.run, REPEATS.value)
    return dict(preset=config_preset, sampler=settings.sampler, steps=steps_total, cfg_scale=settings.cfg_scale,
                latent_frames=length, attention=attention, compile_seconds=sampler.compile_seconds,
                seconds_with_decode=median, runs_seconds=times, sampling_seconds=sample_median)


def sa3_generation_row() -> dict:
    """Row 4: the CPU row's SA3 program (DiT in bf16 here; smoke: the narrowed quick sizes in fp32)."""
    run = sa3_generation(quick=SMOKE.value)

    def make_config(preset, attention):
        config = copy.deepcopy(run.config)
        if not SMOKE.value:
            config.model.dtype = "bfloat16"
            config.model.attention_implementation = attention
        return config

    def build(config):
        return dataclasses.replace(run, config=config).build_ours()

    program, attention = _with_attention_fallback(build, "sa3_small", ATTENTION.value, make_config)
    median, times = _median_seconds(program.run, REPEATS.value)
    return dict(preset="sa3_small + same_s" + (" (narrowed: smoke)" if SMOKE.value else ""), sampler="pingpong",
                steps=SA3_STEPS, cfg_scale=1.0, seconds=run.seconds, latent_frames=run.frames,
                valid_frames=run.valid, prompt_tokens=SA3_PROMPT_TOKENS,
                dit_dtype="float32" if SMOKE.value else "bfloat16",
                decoder_dtype=str(run.section.dtype), attention=attention, compile_seconds=program.compile_seconds,
                seconds_with_decode=median, runs_seconds=times, flops=sa3_generation_flops(run),
                published_h200_seconds=SA3_PUBLISHED_H200_SECONDS)


def markdown(report: dict) -> str:
    train, decode = report["dit_train_sao"], report["decode_sao"]
    gen_small, gen_sao = report["generate_sao_small_pingpong_8"], report["generate_sao_dpmpp3msde_100"]
    mfu = f"{train['mfu']:.1%}" if "mfu" in train else "n/a (peak unknown)"
    lines = [f"# musicdiff accelerator benchmark — {report['device_kind']}, {report['date'][:10]}", "",
             f"One device ({report['device_kind']}, {report['backend']}), jax {report['jax']}; peak "
             f"{report['peak_flops_per_second'] / 1e12:.0f} TFLOP/s bf16 ({report['peak_source']}). Medians of "
             f"{report['repeats']} runs after warm-up." + (" **Smoke mode: tiny shapes, not a result.**"
                                                          if report["smoke"] else ""), "",
             "| row | result | target |", "|---|---|---|",
             f"| DiT training step (:{train['preset']}, batch {train['batch']}, {train['dtype']}, "
             f"attention {train['attention']}) | {train['step_seconds'] * 1e3:.1f} ms/step, "
             f"{train['clips_per_second']:.1f} clips/s, MFU {mfu} | ≥50% MFU on H100 |",
             f"| 8-step ping-pong, 47.55 s clip (:{gen_small['preset']}), decode included | "
             f"{gen_small['seconds_with_decode']:.3f} s (sampling {gen_small['sampling_seconds']:.3f} s) | < 0.3 s |",
             f"| 100-step DPM++ 3M SDE + CFG, 47.55 s clip (:{gen_sao['preset']}), decode included | "
             f"{gen_sao['seconds_with_decode']:.3f} s (sampling {gen_sao['sampling_seconds']:.3f} s) | < 2.5 s |",
             f"| autoencoder decode, 47.55 s ({decode['dtype']}, chunked) | {decode['decode_seconds']:.3f} s | |"]
    sa3 = report.get("generate_sa3_small_pingpong_8")
    if sa3:
        published = sa3["published_h200_seconds"]
        lines.append(f"| SA3 small, {sa3['seconds']:.0f} s: 8-step ping-pong ({sa3['dit_dtype']} DiT, attention "
                     f"{sa3['attention']}) + SAME-S decode ({sa3['decoder_dtype']}), T5Gemma excluded | "
                     f"{sa3['seconds_with_decode']:.3f} s | published H200: {published['pytorch']} s PyTorch, "
                     f"{published['tensorrt']} s TensorRT |")
    lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    device = jax.devices()[0]
    peak, peak_source = device_peak(device)
    report = dict(benchmark="musicdiff accelerator rows", smoke=SMOKE.value, repeats=REPEATS.value,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), host=socket.gethostname(),
                  backend=jax.default_backend(), device_kind=device.device_kind, device_count=jax.device_count(),
                  jax=jax.__version__, peak_flops_per_second=peak, peak_source=peak_source)
    print(f"device {device.device_kind} ({jax.default_backend()}), peak {peak / 1e12:.0f} TFLOP/s ({peak_source})",
          flush=True)
    with unsharded():  # one-device rows; the training row sets its own mesh context
        report["dit_train_sao"] = train_row(peak)
        print(f"train: {report['dit_train_sao']}", flush=True)
        report["decode_sao"] = decode_row()
        print(f"decode: {report['decode_sao']}", flush=True)
        decoder = _decoder(32 if SMOKE.value else CLIP_FRAMES)
        report["generate_sao_small_pingpong_8"] = generation_row("sao_small", decoder)
        print(f"generate 8: {report['generate_sao_small_pingpong_8']}", flush=True)
        report["generate_sao_dpmpp3msde_100"] = generation_row("sao", decoder)
        print(f"generate 100: {report['generate_sao_dpmpp3msde_100']}", flush=True)
        report["generate_sa3_small_pingpong_8"] = sa3_generation_row()
        print(f"generate SA3 small: {report['generate_sa3_small_pingpong_8']}", flush=True)
    report["targets"] = TARGETS
    out = Path(OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    kind = re.sub(r"[^A-Za-z0-9]+", "_", device.device_kind).strip("_").lower()
    stem = (f"accelerator-{kind}-{socket.gethostname()}-{datetime.date.today().isoformat()}"
            + ("-smoke" if SMOKE.value else ""))
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_bytes(out / f"{stem}.md", markdown(report).encode())
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    app.run(main)

"""The rows of the CPU table: for each, how to build our side, the reference side's request, and the work per run.

A row's sizes come in a full and a quick variant (`make bench BENCH_ARGS=--quick`). Both sides get the same shapes,
batch sizes and fp32 models; the reference model configs are exported from ours (musicdiff.convert), so the
architectures agree by construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from bench import flops
from musicdiff.config import load_config
from musicdiff.convert import stable_audio_3_config
from musicdiff.convert.stable_audio_config import reference_dit, reference_model_config
from musicdiff.inference.generate import SAO_SIGMA_MAX, SAO_SIGMA_MIN, SamplerSettings
from musicdiff.models.dit import DiTConfig, dit_forward_flops, dit_train_flops

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 44100
CLIP_FRAMES = 1024  # the 47.55 s window (2,097,152 samples) of SAO
PROMPT_VALID_TOKENS = 20  # real T5 tokens of a typical prompt; the rest is padding
SA3_HEADROOM_SECONDS = 6.0  # StableAudioModel.generate's duration_padding_sec
SA3_PROMPT_TOKENS = 256  # T5Gemma's max_length in the SA3 conditioning (learned padding: all 256 are attended)
SA3_STEPS = 8  # the post-trained checkpoints' ping-pong steps, no CFG (spec §7)


@dataclasses.dataclass
class Row:
    name: str
    title: str
    unit: str  # what `units_per_run` counts, e.g. "s audio", "steps", "clips", "windows"
    units_per_run: float
    flops_per_run: float | None
    build_ours: Callable[[], Any]
    reference_row: str
    reference_params: dict[str, Any]
    shapes: dict[str, Any]
    extrapolate_steps: int = 0  # sampling rows: the full sampler's step count (per-step time × this)
    notes: str = ""
    efficiency_basis: str = "flops"  # or "decode_ceiling" for the data pipeline


def diffusion_config(preset: str) -> ml_collections.ConfigDict:
    """A configs/diffusion.py preset in fp32 (CPU rows: XLA has no fast bf16 matmul on CPU) with every block
    activation-checkpointed, as the reference's ContinuousTransformer always is in training."""
    overrides = ["model.dtype=float32", "model.remat=full"]
    if preset == "tiny":
        # The reference rotates max(head_dim / 2, 32) dims, more than the tiny preset's 16-d heads have: 2 heads of
        # 32 (rotary 32) are the nearest architecture both implementations can build.
        overrides += ["model.num_heads=2", "model.rotary_min_dim=32"]
    config = load_config(str(REPO / "configs" / "diffusion.py") + f":{preset}", overrides)
    if preset == "sao_small":
        # SAO Small's conditioning (spec §8.2): 64 T5 tokens + seconds_total, which is also the 768-d global
        # embedding. (The preset routes seconds_start and seconds_total to the global embedding, 1536-d, which
        # does not fit the preset's global_cond_dim of 768.)
        config.conditioner.conditioning.configs = [
            dict(id="prompt", type="t5", config=dict(t5_model_name="t5-base", max_length=64)),
            dict(id="seconds_total", type="number", config=dict(min_val=0, max_val=256))]
        config.conditioner.cross_attention_cond_ids = ("prompt", "seconds_total")
        config.conditioner.global_cond_ids = ("seconds_total",)
    return config


def autoencoder_section(preset: str) -> ml_collections.ConfigDict:
    return load_config(str(REPO / "configs" / "autoencoder.py") + f":{preset}").autoencoder


def _plain(value):
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, default=list))


def autoencoder_rows(quick: bool) -> list[Row]:
    from bench import ours

    section = autoencoder_section("sao")
    model = flops.abstract_autoencoder(section)
    frames = 32 if quick else 64  # 64 frames = 131,072 samples = 2.97 s: half the reference's chunk length
    samples = frames * model.downsampling_ratio
    seconds = samples / SAMPLE_RATE
    ref_config = reference_model_config(None, _plain(section), samples)
    shapes = {"batch": 1, "samples": samples, "latent_frames": frames, "preset": "configs/autoencoder.py:sao"}
    encode = Row(
        name="ae_encode", title="autoencoder encode (:sao)", unit="s audio", units_per_run=seconds,
        flops_per_run=flops.oobleck_encode_flops(model, samples),
        build_ours=lambda: ours.AutoencoderEncode(section, 1, samples), reference_row="ae_encode",
        reference_params=dict(model_config=ref_config, batch=1, channels=2, samples=samples), shapes=shapes,
        notes="encoder + VAE bottleneck (sampled on both sides); unchunked")
    decode = Row(
        name="ae_decode", title="autoencoder decode (:sao)", unit="s audio", units_per_run=seconds,
        flops_per_run=flops.oobleck_decode_flops(model, frames),
        build_ours=lambda: ours.AutoencoderDecode(section, 1, frames), reference_row="ae_decode",
        reference_params=dict(model_config=ref_config, batch=1, latent_dim=64, frames=frames), shapes=shapes,
        notes="unchunked")
    return [encode, decode]


def dit_train_row(preset: str, quick: bool) -> Row:
    from bench import ours

    config = diffusion_config(preset)
    if preset == "tiny":
        batch, length, tokens, valid, steps = 8, int(config.data.latent_length), 34, 20, (5 if quick else 20)
    else:
        batch, length, tokens, valid, steps = 1, (64 if quick else int(config.data.latent_length)), 65, 41, 1
    training = config.training
    params = dict(objective=config.objective.name, dit_config=reference_dit(_plain(config.model)), batch=batch,
                  length=length, cond_tokens=tokens, valid_tokens=valid, steps_per_run=steps,
                  cfg_dropout_prob=float(training.cfg_dropout_prob),
                  optimizer=dict(lr=float(training.learning_rate), betas=[float(training.b1), float(training.b2)],
                                 eps=float(training.eps), weight_decay=float(training.weight_decay)))
    return Row(
        name=f"dit_train_{preset}", title=f"DiT training step (:{preset})", unit="steps", units_per_run=steps,
        flops_per_run=steps * dit_train_flops(config.model, batch, length, tokens),
        build_ours=lambda: ours.DiTTrainStep(config, batch, length, tokens, valid, steps),
        reference_row="dit_train", reference_params=params,
        shapes=dict(batch=batch, latent_frames=length, cond_tokens=tokens, objective=config.objective.name,
                    remat="every block", preset=f"configs/diffusion.py:{preset}"),
        notes="DiT forward+backward+AdamW on precomputed conditioning; 10% CFG dropout; fp32")


def sampling_row(preset: str, quick: bool, native_window: bool = False) -> Row:
    """A 47.55 s clip (1024 frames), or with `native_window` the preset's own training window."""
    from bench import ours

    config = diffusion_config(preset)
    length = int(config.data.latent_length) if native_window else (256 if quick else CLIP_FRAMES)
    if preset == "sao":
        total_steps, steps = 100, 2  # k-diffusion's 3M SDE fails on a 1-step grid
        settings = SamplerSettings(sampler="dpmpp-3m-sde", steps=steps, cfg_scale=7.0, sigma_min=SAO_SIGMA_MIN,
                                   sigma_max=SAO_SIGMA_MAX, rho=1.0)
        prompt_tokens, timing_tokens = 128, 2
        reference = dict(sampler="dpmpp-3m-sde", sigma_min=SAO_SIGMA_MIN, sigma_max=SAO_SIGMA_MAX, rho=1.0)
    else:
        total_steps, steps = 8, 1
        settings = SamplerSettings(sampler="pingpong", steps=steps, cfg_scale=1.0, sigma_max=1.0)
        prompt_tokens, timing_tokens = 64, 1
        reference = dict(sampler="pingpong", sigma_max=1.0)
    cfg_batch = 2 if settings.cfg_scale != 1.0 else 1
    tokens = prompt_tokens + timing_tokens
    params = dict(objective=config.objective.name, dit_config=reference_dit(_plain(config.model)), batch=1,
                  length=length, cond_tokens=tokens, valid_tokens=PROMPT_VALID_TOKENS, steps=steps,
                  cfg_scale=settings.cfg_scale, **reference)
    seconds = length * 2048 / SAMPLE_RATE
    return Row(
        name=f"sample_{preset}_{settings.sampler.replace('-', '')}" + ("_native" if native_window else ""),
        title=f"{total_steps}-step {settings.sampler} (:{preset}, {seconds:.1f} s clip)",
        unit="steps", units_per_run=steps,
        flops_per_run=steps * dit_forward_flops(config.model, cfg_batch, length, tokens),
        build_ours=lambda: ours.Sampling(config, settings, 1, length, prompt_tokens, PROMPT_VALID_TOKENS),
        reference_row="sampling", reference_params=params, extrapolate_steps=total_steps,
        shapes=dict(batch=1, latent_frames=length, cond_tokens=tokens, cfg_scale=settings.cfg_scale,
                    dit_batch=cfg_batch, measured_steps=steps, preset=f"configs/diffusion.py:{preset}"),
        notes=(f"{steps} sampler steps measured per run (same grid and sampler on both sides, each side's whole "
               f"loop); latency extrapolated to {total_steps} steps"))


def sa3_frames(seconds: float, ratio: int, align_frames: int) -> tuple[int, int]:
    """(latent frames generated, frames valid) for one clip of `seconds`, as the reference's `generate` sizes it
    (spec §4 item 6): (seconds + 6 s headroom) · 44100 samples rounded up to a multiple of the ratio, then of
    `align_frames` frames (SAME's chunk_size / stride); valid = ceil(seconds · 44100 / ratio)
    + ⌊6 s · 44100 / ratio⌋ (sample_diffusion's padding mask), at most the frames generated. generate's
    `sample_size` cap (1292 frames by default) is not applied: it only bites past 114 s."""
    frames = -(-int((seconds + SA3_HEADROOM_SECONDS) * SAMPLE_RATE) // ratio)
    frames = -(-frames // align_frames) * align_frames
    valid = math.ceil(int(seconds * SAMPLE_RATE) / ratio) + int(SA3_HEADROOM_SECONDS * SAMPLE_RATE / ratio)
    return frames, min(valid, frames)


def sa3_generation_config(quick: bool) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(diffusion config, autoencoder section): :sa3_small in fp32 and :same_s, or in quick mode both narrowed to a
    development size (same structure: adaLN blocks, memory tokens, inpainting input, chunked differential SAME)."""
    config = diffusion_config("sa3_small")
    section = autoencoder_section("same_s")
    if quick:
        config.model.update(embed_dim=256, depth=2, num_heads=4)
        section.update(width=128, decoder_depth=2, encoder_depth=2)
    return config, section


@dataclasses.dataclass
class SA3Generation:
    """One SA3 generation's sizes, shared by the CPU row and the accelerator row."""
    config: ml_collections.ConfigDict  # the DiT (and conditioner) config
    section: ml_collections.ConfigDict  # the SAME autoencoder section
    seconds: float
    frames: int  # latent frames generated
    valid: int  # frames under the padding mask
    time_shift: dict[str, Any]  # the reference's sampling shift, as musicdiff TimeShift options
    model_config: dict[str, Any]  # the reference's model_config.json, T5Gemma left out

    def build_ours(self):
        from bench import ours

        return ours.SA3Generation(self.config, self.section, self.frames, self.valid, SA3_STEPS, SA3_PROMPT_TOKENS,
                                  self.seconds, self.time_shift)


def sa3_generation(quick: bool, seconds: float = 30.0) -> SA3Generation:
    """:sa3_small + :same_s (quick: narrowed and a 5 s clip) at the reference generate()'s length for `seconds`."""
    config, section = sa3_generation_config(quick)
    autoencoder = flops.abstract_autoencoder(section)
    seconds = 5.0 if quick else seconds
    frames, valid = sa3_frames(seconds, autoencoder.downsampling_ratio,
                               autoencoder.config.chunk_size // autoencoder.config.stride)
    # The exporter reads every DiT field, defaults included, as a trained checkpoint's config records them.
    resolved = {**_plain(config), "model": _plain(dataclasses.asdict(DiTConfig.from_config(config.model)))}
    model_config = stable_audio_3_config.reference_model_config(resolved, _plain(section))
    # T5Gemma stands outside the timed work on both sides: the reference builds only the seconds_total number
    # conditioner, and both sides are handed the same-shaped precomputed prompt tokens as the "prompt" entry.
    conditioning = model_config["model"]["conditioning"]
    conditioning["configs"] = [entry for entry in conditioning["configs"] if entry["type"] == "number"]
    return SA3Generation(config, section, seconds, frames, valid,
                         stable_audio_3_config.sampling_time_shift(model_config), model_config)


def sa3_generation_flops(run: SA3Generation) -> int:
    """The DiT's ping-pong steps over the generated frames and T5Gemma's tokens + seconds_total, then the decode."""
    tokens = SA3_PROMPT_TOKENS + 1
    return (SA3_STEPS * dit_forward_flops(run.config.model, 1, run.frames, tokens)
            + flops.same_decode_flops(flops.abstract_autoencoder(run.section), run.frames))


def sa3_generation_row(quick: bool) -> Row:
    """Stable Audio 3 small text-to-audio for one clip: 8 ping-pong steps (cfg 1) of the :sa3_small DiT at the
    reference generate()'s length for the clip, then the SAME-S decode of the whole latent sequence."""
    run = sa3_generation(quick)
    config, seconds, frames, valid, shift = run.config, run.seconds, run.frames, run.valid, run.time_shift
    tokens = SA3_PROMPT_TOKENS + 1  # T5Gemma's tokens, then the seconds_total token
    params = dict(model_config=run.model_config, seconds=seconds, frames=frames, steps=SA3_STEPS,
                  headroom_seconds=SA3_HEADROOM_SECONDS, prompt_tokens=SA3_PROMPT_TOKENS,
                  prompt_dim=int(config.model.cond_token_dim))
    return Row(
        name="sa3_generate", title=f"SA3 small, {seconds:.0f} s: {SA3_STEPS}-step ping-pong + SAME-S decode",
        unit="clips", units_per_run=1, flops_per_run=sa3_generation_flops(run), build_ours=run.build_ours,
        reference_row="sa3_generate", reference_params=params,
        shapes=dict(batch=1, seconds=seconds, latent_frames=frames, valid_frames=valid, cond_tokens=tokens,
                    steps=SA3_STEPS, cfg_scale=1.0, time_shift=shift["name"],
                    preset="configs/diffusion.py:sa3_small + configs/autoencoder.py:same_s"
                    + (" (narrowed: quick)" if quick else "")),
        notes=(f"random weights, fp32; each side's whole loop: conditioning, {SA3_STEPS} ping-pong steps with the "
               f"padding mask ({valid} of {frames} frames valid: {seconds:.0f} s + the reference's 6 s headroom, "
               f"rounded as its generate does), the all-zero inpainting input, the reference's default sampling "
               f"shift, then the unchunked SAME decode with the audio zeroed past the valid frames. T5Gemma is not "
               f"run on either side: both get the same precomputed {SA3_PROMPT_TOKENS} prompt tokens (all attended, "
               f"as with SA3's learned padding) beside the seconds_total number conditioner; the reference is the "
               f"vendored stable_audio_3 package (sample_diffusion + pretransform.decode)"))


def precompute_row(workdir: Path, quick: bool, threads: int) -> Row:
    """The tiny autoencoder over a folder of 44.1 kHz clips: our whole stage vs the reference's pre_encode loop."""
    from bench import fixtures, ours

    clips, seconds = (4, 6.0) if quick else (8, 12.0)
    root = fixtures.write_wav_folder(workdir / "precompute_audio", clips, seconds, SAMPLE_RATE)
    checkpoint = fixtures.tiny_autoencoder_checkpoint(workdir / "tiny_autoencoder")
    config = load_config(str(REPO / "configs" / "precompute.py") + ":tiny", [
        f"autoencoder_checkpoint={checkpoint}", f"data.root={root}", "progress=False", f"data.read_threads={threads}"])
    section = autoencoder_section("tiny")
    model = flops.abstract_autoencoder(section)
    sample_size = int(config.data.sample_size)
    windows_per_clip = -(-int(seconds * SAMPLE_RATE) // sample_size)
    windows = clips * windows_per_clip
    params = dict(model_config=reference_model_config(None, _plain(section), sample_size),
                  files=[str(p) for p in sorted(root.glob("*.wav"))], sample_size=sample_size,
                  batch_size=int(config.batch_size), downsampling_ratio=model.downsampling_ratio)
    return Row(
        name="precompute", title="precompute latents (:tiny autoencoder)", unit="windows", units_per_run=windows,
        flops_per_run=windows * flops.oobleck_encode_flops(model, sample_size),
        build_ours=lambda: ours.Precompute(config), reference_row="precompute", reference_params=params,
        shapes=dict(clips=clips, seconds_per_clip=seconds, windows=windows, window_samples=sample_size,
                    batch=int(config.batch_size), preset="configs/precompute.py:tiny"),
        notes=("ours: the whole launch.precompute_latents stage (scan, plan, caption tokenizer, encode, ArrayRecord "
               "shards, manifest); reference: pre_encode.py's loop (decode, pad, encode, .npy + .json per window)"))


def grain_row(workdir: Path, quick: bool, threads: int) -> Row:
    from bench import fixtures, ours
    from data_pipelines.audio_folder import scan
    from data_pipelines.grain_pipeline import AudioFolderSource

    clips, measure = (32, 128) if quick else (64, 256)
    root = fixtures.write_wav_folder(workdir / "grain_audio", clips, 10.0, 48000)
    config = load_config(str(REPO / "configs" / "audio_folder.py"), [
        f"root={root}", "data.batch_size=8", "data.num_workers=0", f"data.read_threads={threads}"])
    source = AudioFolderSource(scan(config).items)
    params = dict(root=str(root), sample_rate=SAMPLE_RATE, sample_size=int(config.data.sample_size), batch_size=8,
                  measure_clips=measure, num_workers=threads)
    return Row(
        name="grain_pipeline", title="audio pipeline (48 -> 44.1 kHz, random crop)", unit="clips",
        units_per_run=measure // 8 * 8, flops_per_run=None,
        build_ours=lambda: ours.AudioPipeline(source, config.data, measure), reference_row="grain_pipeline",
        reference_params=params, efficiency_basis="decode_ceiling",
        shapes=dict(files=clips, seconds_per_file=10.0, file_rate=48000, crop_samples=int(config.data.sample_size),
                    batch=8, workers_reference=threads, read_threads_ours=threads),
        notes=("ours: Grain, crop-only decode + soxr, read threads in-process; reference: SampleDataset + "
               "DataLoader workers (whole-file decode, torchaudio Resample)"))


def all_rows(workdir: Path, quick: bool, threads: int) -> list[Row]:
    return [*autoencoder_rows(quick), dit_train_row("tiny", quick), dit_train_row("sao_small", quick),
            sampling_row("sao_small", quick), sampling_row("sao_small", quick, native_window=True),
            sampling_row("sao", quick), sa3_generation_row(quick), precompute_row(workdir, quick, threads),
            grain_row(workdir, quick, threads)]


__all__ = ["Row", "all_rows", "autoencoder_section", "diffusion_config"]

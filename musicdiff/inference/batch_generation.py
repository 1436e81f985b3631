"""The `launch.generate` stage: prompts in, WAV files + spectrograms + generations.jsonl out.

Clips are generated in fixed-size batches (the last one padded with repeats and trimmed), so one compiled sampler
serves the whole run. Each line of generations.jsonl describes one clip: file, prompt, seed, sampler, steps,
cfg_scale (with negative_prompt, the guidance interval and APG's settings when set), seconds_start, seconds_total,
wall_time (seconds: this clip's share of its batch's conditioning, sampling and decoding, compile time excluded:
samplers are compiled ahead of time and the decoder warmed, and that time is recorded as compile_seconds), plus the
prompt's own fields (e.g. attributes) from a .jsonl prompts file, and init/inpaint details when used.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from musicdiff.audio.io import load_audio, write_audio
from musicdiff.errors import ConfigError
from musicdiff.files import atomic_write_text
from musicdiff.models.weight_adapters import parse_adapter_specs
from musicdiff.diffusion.samplers import check_compatible
from musicdiff.inference.generate import (Generator, SamplerSettings,
                                          mask_from_spans, read_prompts_file)
from musicdiff.inference.inpainting import NOTES, mask_from_file

log = logging.getLogger(__name__)
RESERVED = {"file", "prompt", "seed", "seconds_total", "seconds_start", "negative_prompt"}


def plan_clips(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """One dict per clip to generate: prompt, seed, seconds_start, seconds_total, negative_prompt (when one is given:
    the prompt file's line, else config.negative_prompt), and extra prompt-file fields."""
    if bool(config.prompt) == bool(config.prompts_file):
        raise ConfigError("pass exactly one of --config.prompt=TEXT or --config.prompts_file=FILE")
    items = read_prompts_file(config.prompts_file) if config.prompts_file else [{"prompt": config.prompt}]
    clips = []
    for item in items:
        for repeat in range(int(config.num_per_prompt)):
            clip = {k: v for k, v in item.items() if k not in RESERVED}
            clip.update(prompt=item["prompt"],
                        seconds_total=float(item.get("seconds_total", config.seconds_total)),
                        seconds_start=float(item.get("seconds_start", config.seconds_start)))
            negative = str(item.get("negative_prompt", config.get("negative_prompt", "")))
            if negative:
                clip["negative_prompt"] = negative
            clip["seed"] = int(item["seed"]) + repeat if "seed" in item else None
            clips.append(clip)
    for number, clip in enumerate(clips):
        if clip["seed"] is None:
            clip["seed"] = int(config.seed) + number
    return clips


def _audio_input(path: str, generator: Generator, key: str) -> np.ndarray:
    if not Path(path).is_file():
        raise ConfigError(f"config.{key}={path}: no such audio file")
    audio = load_audio(path, generator.sample_rate, int(generator.autoencoder.config.in_channels))
    return audio[None]


def generate_to_folder(config: ml_collections.ConfigDict, workdir: Path) -> list[dict[str, Any]]:
    if not config.checkpoint:
        raise ConfigError("config.checkpoint is empty: pass --config.checkpoint=RUN (a launch.train_diffusion "
                          "workdir or launch.convert output)")
    workdir = Path(workdir)
    settings = SamplerSettings.from_config(config)
    generator = Generator.from_checkpoint(config.checkpoint, autoencoder_checkpoint=config.autoencoder_checkpoint,
                                          prefer_ema=bool(config.use_ema))
    check_compatible(settings.sampler, generator.config.objective.name)
    generator.load_adapters(parse_adapter_specs(config.get("adapters", "")),
                            (float(config.get("adapter_sigma_min", 0.0)), float(config.get("adapter_sigma_max", math.inf))))
    clips = plan_clips(config)
    init = inpaint = None
    extra: dict[str, Any] = {"adapters": generator.adapters} if generator.adapters else {}
    if config.init_audio:
        if settings.init_noise_level is None:
            raise ConfigError("config.init_audio is set but init_noise_level <= 0; give the noise level to start "
                              "from, e.g. --config.init_noise_level=1.0 (σ) or 0.5 (t, for ddim / rf samplers)")
        init = generator.encode_audio(_audio_input(config.init_audio, generator, "init_audio"))[0]
        extra.update(init_audio=str(config.init_audio), init_noise_level=settings.init_noise_level)
    mask_file = config.get("mask_file", "")
    if config.inpaint_audio or config.mask or mask_file:
        if not (config.inpaint_audio and (config.mask or mask_file)):
            raise ConfigError("inpainting needs both --config.inpaint_audio=WAV and --config.mask=start:end,... (or "
                              "--config.mask_file=FILE.npy)")
        if config.mask and mask_file:
            raise ConfigError("pass one of --config.mask=start:end,... and --config.mask_file=FILE.npy, not both")
        known = generator.encode_audio(_audio_input(config.inpaint_audio, generator, "inpaint_audio"))[0]
        frame_rate = generator.sample_rate / generator.ratio
        if mask_file:
            mask = mask_from_file(mask_file, generator.latent_length)
        else:
            mask = mask_from_spans(config.mask, generator.window_seconds, generator.latent_length, frame_rate)
        inpaint = (known, jnp.asarray(mask)[None, :])
        method = generator.inpainting_method(settings)
        extra.update(inpaint_audio=str(config.inpaint_audio), inpainting=method, inpainting_note=NOTES[method],
                     **({"mask_file": str(mask_file)} if mask_file else {"mask": str(config.mask)}))
    workdir.mkdir(parents=True, exist_ok=True)
    records = _run_batches(generator, clips, settings, int(config.batch_size), init, inpaint, workdir,
                           bool(config.spectrograms), extra)
    jsonl = workdir / "generations.jsonl"
    atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} clip(s) to {workdir} ({jsonl.name}); sampler {settings.sampler}, "
          f"{settings.steps} steps, cfg {settings.cfg_scale}")
    return records


def _guidance_record(settings: SamplerSettings) -> dict[str, Any]:
    """APG's settings and the guidance interval, when set (JSON has no infinity: an open upper end is left out)."""
    out: dict[str, Any] = {}
    if settings.guidance != "cfg":
        out.update(guidance=settings.guidance, apg_parallel=settings.apg_parallel,
                   apg_norm_threshold=settings.apg_norm_threshold)
    if settings.cfg_sigma_min > 0:
        out["cfg_sigma_min"] = settings.cfg_sigma_min
    if not np.isinf(settings.cfg_sigma_max):
        out["cfg_sigma_max"] = settings.cfg_sigma_max
    return out


def _run_batches(generator: Generator, clips: list[dict[str, Any]], settings: SamplerSettings, batch_size: int,
                 init, inpaint, workdir: Path, spectrograms: bool, extra: dict[str, Any]) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from musicdiff.audio.spectrogram import save_spectrogram_png

    records = []
    digits = max(3, len(str(len(clips) - 1)))
    bar = tqdm(total=len(clips), unit="clip", dynamic_ncols=True)
    for start in range(0, len(clips), batch_size):
        chunk = clips[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        batch_init = None if init is None else jnp.broadcast_to(init, (batch_size, *init.shape))
        batch_inpaint = None if inpaint is None else tuple(
            jnp.broadcast_to(a, (batch_size, *a.shape)) for a in inpaint)
        compiled_before = generator.compile_seconds
        began = time.perf_counter()
        latents = generator.sample_latents([c["prompt"] for c in padded], [c["seconds_total"] for c in padded],
                                           settings, [c["seed"] for c in padded],
                                           seconds_start=[c["seconds_start"] for c in padded], init=batch_init,
                                           inpaint=batch_inpaint,
                                           negative_prompts=[c.get("negative_prompt", "") for c in padded])
        audio = generator.decode(latents)
        compile_seconds = generator.compile_seconds - compiled_before
        elapsed = time.perf_counter() - began - compile_seconds
        for offset, clip in enumerate(chunk):
            number = start + offset
            name = f"{number:0{digits}d}"
            clip_audio = generator.trim(audio[offset], clip["seconds_total"])
            write_audio(workdir / f"{name}.wav", clip_audio, generator.sample_rate)
            if spectrograms:
                save_spectrogram_png(clip_audio, generator.sample_rate, workdir / f"{name}.png",
                                     title=clip["prompt"][:80])
            record = {"file": f"{name}.wav", **clip, "sampler": settings.sampler, "steps": settings.steps,
                      "cfg_scale": settings.cfg_scale, **_guidance_record(settings), "wall_time": elapsed / len(chunk),
                      "batch_size": batch_size, "compile_seconds": compile_seconds, **extra}
            records.append(record)
        bar.update(len(chunk))
    bar.close()
    return records

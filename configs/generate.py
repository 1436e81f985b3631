"""Generation settings: `python -m launch.generate --config=configs/generate.py[:PRESET] --config.checkpoint=RUN
--config.prompt="..." --workdir=OUT`.

Presets: "" (SAO's model-card settings: DPM++ 3M SDE, 100 steps, CFG 7, σ 0.3..500), "fast" (8-step ping-pong with
CFG 1, for rectified-flow / ARC models such as SAO Small), "demo" (what `make demo` uses on the tiny model), "sa3"
(Stable Audio 3 post-trained: 8 ping-pong steps, no CFG) and "sa3_base" (its base checkpoints: Euler, 50 steps, APG 7).

- checkpoint: a launch.train_diffusion workdir (or checkpoints dir, or one step's dir) or launch.convert output.
- prompt / prompts_file: one prompt, or a file (.txt one prompt a line; .jsonl objects with "prompt" and optional
  "seconds_total", "seconds_start", "seed", "attributes"). num_per_prompt clips each.
- seconds_total / seconds_start: timing conditioning; the WAV is trimmed to seconds_total.
- negative_prompt: guidance steers away from it (it replaces the null condition's text; a .jsonl prompts file may
  give one per line). cfg_sigma_min / cfg_sigma_max: guidance only at noise levels σ/α in that interval (σ of the
  σ-space samplers; rectified flow's t is σ/(1 + σ), t = 0.5 at σ = 1), the conditional model alone elsewhere.
- guidance: "cfg" (on the model output, as SAO; cfg_rescale = its scale_phi) or "apg" (adaptive projected guidance on
  the x0 estimate, as Stable Audio 3: apg_parallel weighs the guidance's part along the conditional estimate, 0 drops
  it; apg_norm_threshold > 0 clips the guidance's norm per clip).
- seed: clip k of the run uses seed + k unless its prompts_file line gives one.
- init_audio + init_noise_level: audio-to-audio (σ for σ-space samplers, t in (0, 1] for ddim and rf samplers).
- inpaint_audio + mask ("start:end,..." in seconds, regenerated; the rest is kept; continuation: "T:" keeps the first
  T seconds of inpaint_audio and generates the rest of the window) or + mask_file (a .npy of shape [latent frames of
  the window], one 0/1 value per latent frame: 1 = keep, 0 = generate). A model trained with the inpainting input
  (model.local_cond_dim > 0) is given the mask and the known latents at every step; others get the RePaint-style
  merge; inpainting="trained_merge" gives such a model both. generations.jsonl's "inpainting" says which
  ("trained_input", "repaint_fallback" or "trained_input_merge").
- eta < 0 means the sampler's default; init_noise_level <= 0 means no init.
- adapters: weight adapters (launch.train_lora's WORKDIR/adapter.safetensors; LoRA, DoRA or LoRA-XS) stacked in order,
  "FILE[:STRENGTH],..." (strength 1 by default, 0 = off); adapter_sigma_min / adapter_sigma_max: they act on the
  denoiser only at noise levels σ/α in that interval (the conditioner, run once, keeps them on).
- length_bucket_frames / time_shift: variable-length generation (Stable Audio 3 style; musicdiff/inference/generate.py).
"""

import ml_collections

from musicdiff.config import choose_preset
from musicdiff.diffusion.time_shift import time_shift_config

PRESETS = {
    "": dict(sampler="dpmpp-3m-sde", steps=100, cfg_scale=7.0, sigma_min=0.3, sigma_max=500.0),
    "fast": dict(sampler="pingpong", steps=8, cfg_scale=1.0, sigma_min=0.3, sigma_max=1.0),
    "demo": dict(sampler="dpmpp-3m-sde", steps=50, cfg_scale=4.0, sigma_min=0.03, sigma_max=80.0, batch_size=4),
    # Stable Audio 3 (docs/stable_audio_3.md): post-trained checkpoints sample with 8 ping-pong steps and no CFG;
    # base checkpoints (the -base ones LoRAs train on) with Euler, 50 steps, APG at 7. Both on the reference's
    # default schedule (LogSNR, length-independent) and only the frames a clip needs, in pairs (SAME-S decodes 2-frame
    # chunks). launch.convert prints a converted model's own sampling shift when its config names one.
    "sa3": dict(sampler="pingpong", steps=8, cfg_scale=1.0, sigma_min=0.0, sigma_max=1.0, length_bucket_frames=2,
                time_shift=dict(time_shift_config(), name="logsnr", rate=0.0)),
    "sa3_base": dict(sampler="rf-euler", steps=50, cfg_scale=7.0, guidance="apg", sigma_min=0.0, sigma_max=1.0,
                     length_bucket_frames=2, time_shift=dict(time_shift_config(), name="logsnr", rate=0.0)),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    preset = choose_preset(arg, PRESETS)
    c = ml_collections.ConfigDict(dict(
        checkpoint="",
        autoencoder_checkpoint="",  # "" = the one the diffusion checkpoint names
        use_ema=True,
        prompt="",
        prompts_file="",
        num_per_prompt=1,
        seconds_total=10.0,
        seconds_start=0.0,
        seed=0,
        batch_size=4,
        sampler="dpmpp-3m-sde",
        steps=100,
        cfg_scale=7.0,
        cfg_rescale=0.0,
        negative_prompt="",
        cfg_sigma_min=0.0,
        cfg_sigma_max=float("inf"),
        guidance="cfg",
        apg_parallel=0.0,
        apg_norm_threshold=0.0,
        sigma_min=0.3,
        sigma_max=500.0,
        rho=1.0,
        eta=-1.0,
        init_audio="",
        init_noise_level=0.0,
        inpaint_audio="",
        mask="",
        mask_file="",  # .npy [latent frames], 1 = keep, 0 = generate; instead of mask
        spectrograms=True,
        # "auto": a model's trained inpainting input when it has one, else RePaint; "repaint": RePaint always;
        # "trained_merge": the trained input plus RePaint's merge after every step (SA3's TensorRT port)
        inpainting="auto",
        adapters="",  # weight adapters stacked in order: "FILE[:STRENGTH],FILE2[:STRENGTH]" (launch.train_lora output)
        adapter_sigma_min=0.0,  # the adapters act at noise levels σ/α in [min, max] only (as cfg_sigma_min/max)
        adapter_sigma_max=float("inf"),
        # > 0: generate only the latent frames the batch's longest clip needs, rounded up to a multiple of this (at
        # most the training window), the rest of each clip masked as padding; needs a model that takes a padding
        # mask (the DiT) and a multiple of its patch_size. 0: always the whole window, trimmed (SAO).
        length_bucket_frames=0,
        # Length-aware shift of rectified-flow time grids (rf-euler, pingpong) at each clip's needed frames:
        # name "none" | "full" | "flux" | "logsnr" plus that family's options (musicdiff/diffusion/time_shift.py,
        # e.g. --config.time_shift.name=full --config.time_shift.max_shift=1.15).
        time_shift=time_shift_config(),
    ))
    c.update(preset)
    return c

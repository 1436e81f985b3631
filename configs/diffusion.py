"""Diffusion (DiT) training configs: `--config=configs/diffusion.py:PRESET`, PRESET in sao, sao_small, tiny, demo,
sa3_small, sa3_medium, sa3_tiny.

- sao: Stable Audio Open 1.0's DiT (spec §2.1): 1,056,828,544 parameters, v-objective, 1024 latent frames.
- sao_small: Stable Audio Open Small's DiT (spec §8.2): 340,863,104 parameters, rectified flow, 256 frames.
- tiny: a 2-block DiT that trains on CPU in seconds (tests), conditioned through the embedded text encoder.
- sa3_small / sa3_medium: Stable Audio 3's DiTs (spec §3.1; 256 latent channels at 44100/4096 frames/s): width 1024 x
  20 blocks, 16 heads (small-music / small-sfx) and 1536 x 24, 24 heads with differential self- and cross-attention
  (medium); SA3 adaLN blocks (sa3_adaln), RMSNorm and qk-RMSNorm, 64 memory tokens, ExpoFourier timestep features,
  the 257-channel inpainting input in every block. Conditioning (SA3_CONDITIONING): the T5Gemma prompt (256 tokens,
  learned padding) and `seconds_total` (expo number conditioner over [0, 384] s), which is both the 257th
  cross-attention token and the global vector; CFG drops the whole cross context and keeps the global vector.
  Rectified flow; the post-trained checkpoints (rf_denoiser) sample with 8 ping-pong steps and no CFG, the base
  checkpoints with Euler and APG guidance (~50 steps, CFG 7; configs/generate.py's sampler options). Parameters
  (tests/test_sa3_dit.py derives them from the released key shapes): small DiT 459,130,880 (the report's 459M; the
  README's 433M is that less the per-block inpainting MLPs, 20 x 1,313,792), medium 1,453,170,176; conditioner
  198,144 (seconds Linear 256 -> 768 with bias, and the 768-wide padding embedding).
- sa3_tiny: the SA3 structure at width 128 (2 heads of 64: the rotary dim is max(head_dim/2, 32)), 2 blocks, 4 memory
  tokens, 16 latent channels, the embedded text encoder in place of T5Gemma (tests).
- demo: the `make demo` DiT: 4 blocks of width 128 over the 32-channel latents of configs/autoencoder.py:demo, 256
  frames (4.1 s at 16 kHz) read as 128 tokens of 2 frames (patch_size 2), batch 16, rectified flow with logit-normal
  times, prompts through the embedded text encoder with digits as tokens. On 2 CPU cores a narrow model taking more
  steps learns more than a wider one at equal wall time (demo-learnability review). Patches trade batch for token
  width at equal step cost: with 4 frames a token is 128 wide, as wide as the model, and its denoising loss was
  9-11% higher at every noise level than with 2 frames (batch 32 vs 16, 2000 vs 1600 steps, 128 training windows,
  95% intervals apart); 1 frame at batch 8 was 0.5-5% worse than 2.
  The prompt's tempo and key also reach the DiT as frame features beside the latents (`beat_grid`, `key_chroma`:
  musicdiff/models/frame_conditioner.py; 36 input channels). Without them the DiT did not learn tempo from the text
  in the demo's budget (tempo 0.09 at 1600 steps, whatever told it the number or the position: below); with the
  beat grid it scored 0.91 at 1600 steps and 0.94 at 800 (32 held-out prompts, ceiling 0.91).

Sections: `model` (the DiT), `conditioner` (a stable-audio-tools `conditioning` block with its routing, built as
musicdiff.models.conditioning.MultiConditioner), `prompt_encoder` (how prompts become the prompt conditioner's input at
generation time: "t5" = frozen T5 from a local directory or hub name, "embedded" = the caption tokenizer, whose encoder
lives inside the conditioner and trains with the DiT), `objective`, `training`, `data`, `distributed` (multi-host:
musicdiff/parallel/distributed.py, launch/README.md), `inpainting` (mask types and context loss of the inpainting
input, used when model.local_cond_dim > 0). `autoencoder_checkpoint` names the autoencoder whose latents
the DiT models ("" = the one recorded in the latents manifest).
Checkpoints hold params/{model, conditioner} and ema/{model, conditioner}.
A preset's `number_max` (embedded text only) adds the value of each number in a caption to its digit tokens
(musicdiff/models/text_encoder/numbers.py; needs latents precomputed with text_encoder.split_digits=True). On the demo
it did not teach tempo within 1600 steps (tempo 0.09, key 0.22 on 32 held-out prompts), so no preset sets it.
Neither did `model.sinusoidal_embedding=True` (absolute token positions; tempo 0.09, key 0.19 at 1600 steps).

The optimiser recipe is SAO's (spec §3.4): AdamW(5e-5, (0.9, 0.999), wd 1e-3) with InverseLR
lr(step) = lr · (1 - warmup^(step+1)) · (1 + step/inv_gamma)^(-power), EMA 0.9999 with power-3/4 warm-up,
10% CFG dropout of the cross-attention tokens, no gradient clipping (the reference's --gradient-clip-val 0).
"""

import copy

import ml_collections

from musicdiff.config import choose_preset, stage_config
from musicdiff.diffusion.time_shift import time_shift_config
from musicdiff.models.beat_grid import DEFAULT_HARMONICS, grid_channels
from musicdiff.models.key_chroma import CHANNELS as KEY_CHANNELS

# Stable Audio 3's DiT options (spec §3.1-3.2), shared by its presets.
SA3_MODEL = dict(io_channels=256, cond_token_dim=768, global_cond_dim=768, project_cond_tokens=True,
                 block_type="sa3_adaln", norm_type="rms_norm", qk_norm="rms", num_memory_tokens=64,
                 local_cond_dim=257, timestep_features_type="expo", use_cross_attn_mask=False)

PRESETS = {
    "sao": dict(
        model=dict(io_channels=64, embed_dim=1536, depth=24, num_heads=24, cond_token_dim=768, global_cond_dim=1536,
                   project_cond_tokens=False, remat="full", dtype="bfloat16"),
        objective="v", latent_length=1024, cond_tokens=130, batch_size=32, cond_dim=768, text="t5",
    ),
    "sao_small": dict(
        model=dict(io_channels=64, embed_dim=1024, depth=16, num_heads=8, cond_token_dim=768, global_cond_dim=768,
                   project_cond_tokens=True, remat="full", dtype="bfloat16"),
        objective="rectified_flow", latent_length=256, cond_tokens=65, batch_size=64, cond_dim=768, text="t5",
    ),
    "tiny": dict(
        model=dict(io_channels=64, embed_dim=64, depth=2, num_heads=4, cond_token_dim=32, global_cond_dim=64,
                   project_cond_tokens=False, remat="none", dtype="float32", rotary_min_dim=8),
        objective="v", latent_length=32, cond_tokens=34, batch_size=8, cond_dim=32, text="embedded",
        training=dict(num_steps=200, learning_rate=1e-3, log_every=10, checkpoint_every=100),
    ),
    "sa3_small": dict(
        model=dict(SA3_MODEL, embed_dim=1024, depth=20, num_heads=16, remat="full", dtype="bfloat16"),
        objective="rectified_flow", latent_length=1292, cond_tokens=257, batch_size=32, cond_dim=768,
        text="t5gemma", conditioning="sa3",
    ),
    "sa3_medium": dict(
        model=dict(SA3_MODEL, embed_dim=1536, depth=24, num_heads=24, differential_attention=True, remat="full",
                   dtype="bfloat16"),
        objective="rectified_flow", latent_length=4092, cond_tokens=257, batch_size=16, cond_dim=768,
        text="t5gemma", conditioning="sa3",
    ),
    "sa3_tiny": dict(
        model=dict(SA3_MODEL, io_channels=16, local_cond_dim=17, embed_dim=128, depth=2, num_heads=2,
                   cond_token_dim=64, global_cond_dim=64, num_memory_tokens=4, remat="none", dtype="float32"),
        objective="rectified_flow", latent_length=32, cond_tokens=33, batch_size=8, cond_dim=64, text="embedded",
        conditioning="sa3", training=dict(num_steps=200, learning_rate=1e-3, log_every=10, checkpoint_every=100),
    ),
    "demo": dict(
        model=dict(io_channels=32, embed_dim=128, depth=4, num_heads=4, cond_token_dim=32, global_cond_dim=64,
                   project_cond_tokens=True, remat="none", dtype="float32", rotary_min_dim=8, patch_size=2),
        # cond_tokens: the 48 caption tokens of configs/precompute.py:demo (training takes the token length from the
        # latents manifest) + 2 timing tokens
        objective="rectified_flow", timestep_sampler="logit_normal", latent_length=256, cond_tokens=50,
        batch_size=16, cond_dim=32, text="embedded",
        beat_grid=dict(harmonics=DEFAULT_HARMONICS, dropout=0.1), key_chroma=dict(dropout=0.1),
        training=dict(num_steps=800, learning_rate=1e-3, log_every=25, checkpoint_every=800),
    ),
}


# The small trainable prompt encoder of the embedded default (T5 architecture over the caption tokenizer).
EMBEDDED_TEXT = dict(vocab_size=1024, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=64,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0, max_length=32)


# SAO's training demos (spec §3.4), for the pretrained text encoders.
SAO_DEMO_PROMPTS = ("Amen break 174 BPM", "A beautiful orchestral symphony, classical music",
                    "Chill hip-hop beat, chillhop", "A pop song about love and loss")
DEMO_PROMPTS = {
    # SAO's demos and captions in the style of the embedded set.
    "t5": SAO_DEMO_PROMPTS,
    "t5gemma": SAO_DEMO_PROMPTS,
    "embedded": ("an upbeat track in A minor at 128 BPM with plucked bass and drums",
                 "a calm piano piece in C major at 80 BPM"),
}


# Per text-encoder kind a preset's `text` may name: the prompt conditioner entry and the generation-time
# prompt_encoder section (musicdiff/models/text_encoder/builtin.py).
PROMPT_CONDITIONERS = {
    "t5": dict(id="prompt", type="t5", config=dict(t5_model_name="t5-base", max_length=128)),
    # Stable Audio 3's prompt (spec §3.3): 256 tokens, pads replaced by a learned vector, no projection at 768.
    "t5gemma": dict(id="prompt", type="t5gemma", config=dict(t5gemma_model_name="google/t5gemma-b-b-ul2",
                                                             max_length=256, padding_mode="learned")),
    "embedded": dict(id="prompt", type="embedded", config=EMBEDDED_TEXT),
}
PROMPT_ENCODERS = {
    "t5": dict(name="t5", path="t5-base", max_length=128, dtype="float32", param_dtype="float32"),
    "t5gemma": dict(name="t5gemma", path="google/t5gemma-b-b-ul2", max_length=256, dtype="float32",
                    param_dtype="float32"),
    "embedded": dict(name="embedded", tokenizer_path="", max_length=EMBEDDED_TEXT["max_length"],
                     vocab_size=EMBEDDED_TEXT["vocab_size"]),
}


def _for_text(table: dict, text: str) -> dict:
    if text not in table:
        raise ValueError(f"text encoder {text!r} has no preset section; choose one of {', '.join(table)}")
    return copy.deepcopy(table[text])


def conditioner_config(text: str, cond_dim: int, number_max: float = 0.0, beat_grid: dict | None = None,
                       key_chroma: dict | None = None) -> ml_collections.ConfigDict:
    """SAO's conditioning (spec §8.1): prompt + seconds_start + seconds_total as cross-attention tokens, the two
    timing values concatenated as the global embedding. `number_max` > 0 makes the embedded prompt encoder
    number-aware (numbers in [0, number_max]; musicdiff/models/text_encoder/numbers.py). `beat_grid` (its config:
    harmonics, dropout) and `key_chroma` (dropout) add the prompt's tempo and key as frame features concatenated to
    the DiT's input (ids "tempo" and "key"; musicdiff/models/frame_conditioner.py; the window comes from the
    latents)."""
    timing = [dict(id=name, type="number", config=dict(min_val=0, max_val=512))
              for name in ("seconds_start", "seconds_total")]
    prompt = _for_text(PROMPT_CONDITIONERS, text)
    if number_max:
        if text != "embedded":
            raise ValueError(f"number_max: only the embedded text encoder has a number embedding, not {text!r}")
        prompt["config"]["number_max"] = float(number_max)
    section = dict(
        name="multi_conditioner",
        conditioning=dict(configs=[prompt] + timing, cond_dim=cond_dim),
        cross_attention_cond_ids=("prompt", "seconds_start", "seconds_total"),
        global_cond_ids=("seconds_start", "seconds_total"),
    )
    framed = []
    if beat_grid:
        framed.append(dict(id="tempo", type="beat_grid", config=dict(frames=0, frame_rate=0.0, **beat_grid)))
    if key_chroma:
        framed.append(dict(id="key", type="key_chroma", config=dict(frames=0, frame_rate=0.0, **key_chroma)))
    if framed:
        section["conditioning"]["configs"].extend(framed)
        section["input_concat_cond_ids"] = tuple(entry["id"] for entry in framed)
    return ml_collections.ConfigDict(section)


SA3_SECONDS_TOTAL = dict(id="seconds_total", type="number",
                         config=dict(min_val=0, max_val=384, fourier_features_type="expo"))


def sa3_conditioner_config(text: str, cond_dim: int) -> ml_collections.ConfigDict:
    """Stable Audio 3's conditioning (spec §3.3): the prompt's tokens then the `seconds_total` token as cross-attention
    context, `seconds_total` alone as the global vector; no seconds_start. The prompt pads with a learned vector."""
    prompt = _for_text(PROMPT_CONDITIONERS, text)
    prompt["config"]["padding_mode"] = "learned"
    return ml_collections.ConfigDict(dict(
        name="multi_conditioner",
        conditioning=dict(configs=[prompt, copy.deepcopy(SA3_SECONDS_TOTAL)], cond_dim=cond_dim),
        cross_attention_cond_ids=("prompt", "seconds_total"),
        global_cond_ids=("seconds_total",),
    ))


def prompt_encoder_config(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(_for_text(PROMPT_ENCODERS, text))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    preset = choose_preset(arg, PRESETS)
    c = stage_config(preset["batch_size"], distributed=True)
    c.trainer = "diffusion"  # a registered trainer (musicdiff/training/trainer.py)

    c.model = ml_collections.ConfigDict(dict(
        name="dit",
        transformer_type="continuous_transformer",
        block_type="sao",  # "sao" | "adaln_zero" | "sa3_adaln" (Stable Audio 3)
        timestep_features_dim=256,
        timestep_features_type="learned",  # "learned" (SAO) | "expo" (SA3's fixed ExpoFourier features)
        timestep_features_logsnr=False,  # features of the normalised log-SNR of t instead of t
        norm_type="layer_norm",  # "layer_norm" | "rms_norm" (SA3)
        differential_attention=False,  # SA3 medium
        num_memory_tokens=0,  # SA3: 64
        ff_mult=4,
        rotary_min_dim=32,
        rotary_base=10000.0,
        layer_norm_eps=1e-5,
        use_cross_attn_mask=True,
        qk_norm="none",  # "ln": LayerNorm over each head's q and k (SAO Small); "rms": RMSNorm (SA3)
        attention_implementation="auto",  # "auto" | "xla" | "cudnn"
        patch_size=1,  # latent frames per token (1 = SAO; p > 1 shortens the sequence p times)
        sinusoidal_embedding=False,  # absolute positions beside rotary (the reference's use_sinusoidal_emb)
        local_cond_dim=0,  # > 0: the inpainting input (see `inpainting` below); io_channels + 1 when used
        param_dtype="float32",
    ))
    c.model.update(preset["model"])

    if preset.get("conditioning") == "sa3":
        c.conditioner = sa3_conditioner_config(preset["text"], preset["cond_dim"])
    else:
        c.conditioner = conditioner_config(preset["text"], preset["cond_dim"], preset.get("number_max", 0.0),
                                           preset.get("beat_grid"), preset.get("key_chroma"))
    framed = ((grid_channels(preset["beat_grid"]["harmonics"]) if preset.get("beat_grid") else 0)
              + (KEY_CHANNELS if preset.get("key_chroma") else 0))
    if framed:
        c.model.input_concat_dim = framed
    c.prompt_encoder = prompt_encoder_config(preset["text"])
    c.autoencoder_checkpoint = ""
    c.init_from = ""  # a checkpoint whose weights (EMA when present) start a new run; the optimiser starts fresh

    c.objective = ml_collections.ConfigDict(dict(
        name=preset["objective"],  # "v" | "rectified_flow" | "ddpm_eps"
        # "uniform" | "logit_normal" | "truncated_logit_normal" | SA3's "sa3_truncated_logit_normal" | "log_snr" |
        # "log_snr_uniform" (musicdiff/diffusion/timesteps.py), with their options below
        timestep_sampler=preset.get("timestep_sampler", "uniform"),
        t_min=0.0,
        t_max=1.0,
        logit_mean=0.0,
        logit_std=1.0,
        sa3_left_trunc=0.075,
        mean_logsnr=-1.2,
        std_logsnr=2.0,
        min_logsnr=-6.0,
        max_logsnr=5.0,
        p_one_shot=0.0,  # probability of training at t = 1 (pure noise), any sampler
        # Variable-length batches: each sample's loss over its valid latent frames, and a denoiser that takes a
        # padding mask (the DiT) keeps the padded frames out of self-attention (spec §4; off in the SAO recipe).
        mask_padding=False,
        # Training-time length-aware shift of t at each sample's valid length (musicdiff/diffusion/time_shift.py):
        # name "none" | "full" | "flux" | "logsnr", with that family's options (all listed, defaults of time_shift.py).
        time_shift=time_shift_config(),
        ddpm_schedule="linear",  # "linear" | "cosine"
        ddpm_num_steps=1000,
        ddpm_beta_start=1e-4,
        ddpm_beta_end=0.02,
    ))

    # Inpainting / continuation training (Stable Audio 3, spec §5; musicdiff/training/inpainting.py): used when
    # model.local_cond_dim > 0, which must then be io_channels + 1 (e.g. --config.model.local_cond_dim=33 on :demo).
    # Per sample a mask type is drawn with these probabilities (normalised): "full" = text-to-audio, "causal" =
    # continuation of a random prefix, "spans" = 1-4 non-overlapping generated spans covering 20-100% (what
    # launch.generate's mask="start:end,..." asks for), "segments" = SA3's legacy short, possibly overlapping holes.
    # SA3's code and LoRA-script default is segments 0.1, full 0.8, causal 0.1, spans 0; here 0.1 of "full" goes to
    # "spans", which that default never draws although span inpainting is what generation offers. The loss covers
    # the generated frames; context_loss_weight > 0 adds that weight times the per-sample MSE over the context frames
    # (SA3's LoRA script: 1.0).
    c.inpainting = ml_collections.ConfigDict(dict(
        mask_probabilities=dict(full=0.7, causal=0.1, spans=0.1, segments=0.1),
        context_loss_weight=0.0,
    ))

    c.training = ml_collections.ConfigDict(dict(
        num_steps=100_000,
        optimizer="adamw",
        learning_rate=5e-5,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=1e-3,
        lr_schedule="inverse",  # InverseLR
        lr_inv_gamma=1e6,
        lr_power=0.5,
        lr_warmup=0.99,
        final_lr=0.0,
        grad_clip_norm=0.0,  # 0 = off, as the reference
        ema_decay=0.9999,  # maximum EMA decay
        ema_power=0.75,
        ema_inv_gamma=1.0,
        ema_update_after_step=1,
        cfg_dropout_prob=0.1,
        max_nonfinite_steps=20,  # halt after this many consecutive skipped updates (non-finite loss or gradients)
        trainable=(),  # glob patterns of parameters to train (inside params/, e.g. "model/transformer/*"); () = all
        frozen=(),  # glob patterns of parameters to freeze (no optimiser state, no update)
        peak_flops_per_device=0.0,  # device peak FLOP/s for the MFU metric (0 = unknown: no MFU); H100 bf16 ~989e12
        log_every=100,
        checkpoint_every=10_000,
        keep_checkpoints=3,
        keep_period=0,  # also keep every step that is a multiple of this (0 = off)
        save_initial_checkpoint=False,  # checkpoint step 0 too (a baseline for launch.evaluate series)
        preemption_sync_every=10,  # multi-host: steps between agreeing on a SIGTERM (save + exit 0 at that step)
        demo_every=0,  # generate demo clips (TensorBoard audio + spectrograms) every N steps; 0 = never
        demo_steps=50,
        demo_cfg_scale=6.0,
        demo_prompts=DEMO_PROMPTS[preset["text"]],
    ))
    c.training.update(preset.get("training", {}))

    c.data = ml_collections.ConfigDict(dict(
        latents="",  # directory of pre-encoded latent records
        latent_length=preset["latent_length"],  # latent frames per training window
        cond_tokens=preset["cond_tokens"],  # cross-attention tokens (T5 + timing)
        sample_rate=44100,
        shuffle_seed=0,
    ))
    return c

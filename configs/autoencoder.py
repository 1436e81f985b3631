"""Autoencoder configs: `--config=configs/autoencoder.py:PRESET`, PRESET in sao, tiny, vq_tiny, demo (Oobleck) and
same_s, same_l, same_tiny (Stable Audio 3's SAME, musicdiff/models/same.py).

- same_s / same_l: the released SAME-S / SAME-L sizes (stable_audio_3.md §2.4, the MLX ports' constants), 4096x,
  latent_dim 256: 108,244,529 and 852,127,073 parameters (counted from the key shapes in tests/test_same.py; the
  tech report's 108M / 852M, not the docs' 266M / 1.7B). Their training recipe is unpublished: crops, batch, learning
  rates and the softnorm weight here are SAO's choices, not SA3's.
- same_tiny: SAME-S's structure at 64x (patch 16, stride 4), width 32, 2 + 2 blocks; trains steps in seconds on CPU.

- sao: Stable Audio Open 1.0's VAE (spec §1.1): channels 128, c_mults [1,2,4,8,16], strides [2,4,4,8,8] (2048×),
  latent_dim 64, VAE bottleneck; 156,112,514 parameters. Training recipe of spec §1.9 (65,536-sample stereo crops).
- tiny: channels 16, c_mults [1,2,4,4], strides [2,4,4,8] (256×, 172 latent frames/s at 44.1 kHz), latent_dim 64
  (the io_channels of configs/diffusion.py:tiny), VAE; 506,098 parameters, small enough to train for a few
  hundred steps on 2 CPU cores on 16,384-sample (0.37 s) crops.
- vq_tiny: tiny with a 4-stage residual VQ (256 codes of dimension 8 each) instead of the VAE.
- demo: the `make demo` autoencoder: tiny's network at 16 kHz mono with latent_dim 32 (256x: 62.5 latent frames/s,
  a 4.1 s clip is 256 frames), trained on reconstruction only (no adversarial phase within the demo's minutes) with
  waveform L1 beside the MR-STFT loss and no A-weighting: without them pitch is lost to a hum at the latent frame
  rate (../shared/reviews/demo-learnability-2026-12-06.md). Nearest-neighbour upsampling in the decoder, batch 4 and
  L1 weight 40: on 32 held-out clips after 1000 steps (~5 min on 2 CPU cores) these took the reconstructions from
  mel distance 2.19 / SI-SDR -2.3 dB / key 0.66 (transposed convs, batch 8, L1 10, 400 steps in the same minutes)
  to 1.65 / +1.9 dB / 0.91; L1 10 and 20 gave 1.79 / -0.8 dB / 0.81 and 1.58 / +0.2 dB / 0.78.
  Then L1 80 with a mel term of weight 0.5, 1400 steps (mel / SI-SDR / tempo / key of the reconstructions):
  1.34 / +3.0 dB / 0.91 / 0.94 on those 32 clips, 1.44 / +4.1 dB / 0.77 / 0.91 on 96 others (the real clips there:
  tempo 0.73, key 0.95), against L1 40 alone at 1200 steps 1.49 / +2.4 dB / 0.91 / 0.94 and 1.60 / +3.2 dB / 0.76 /
  0.92. Steps alone lower the mel distance but lose tempo (L1 40: 1400 steps 1.36 / 0.75, 1600 1.29 / 0.72 on the
  32); more L1 keeps the onsets (L1 80, 1400 steps: 1.50 / 0.94) and the mel term buys the mel distance back.

    python -m launch.describe --config=configs/autoencoder.py:sao --workdir=/tmp/describe_ae
"""

import ml_collections

from data_pipelines.audio_folder import audio_folder_data
from musicdiff.config import choose_preset, stage_config

SAO_STFT_FFT_SIZES = (2048, 1024, 512, 256, 128, 64, 32)  # hops are fft / 4, windows = fft (spec §1.9)
SAO_DISCRIMINATOR_FFT_SIZES = (2048, 1024, 512, 256, 128)

# SAME (stable_audio_3.md §2.4, sizes from the MLX ports `optimized/mlx/models/defs/same_{s,l}_*.py`). Every SAME
# option is spelled out here; musicdiff/models/same.py documents them.
SAME_S = dict(patch_size=256, strides=(16,), width=768, latent_dim=256, encoder_depth=6, decoder_depth=6, head_dim=64,
              ff_mult=3, attention="chunked", chunk_size=32, chunk_midpoint_shift=True, sliding_window=1,
              differential=True, variable_stride=True, encoder_mapping_kernel=1, decoder_mapping_kernel=3,
              decoder_sinusoidal_blocks=0, soft_clip=False, remat=True)
SAME_L = {**SAME_S, "width": 1536, "encoder_depth": 12, "decoder_depth": 12, "attention": "sliding_window",
          "decoder_mapping_kernel": 1, "decoder_sinusoidal_blocks": 8}
# SAME-S's structure at 64x (patch 16, stride 4: 689 latent frames/s at 44.1 kHz), width 32 in 2 heads of 16, chunks
# of 2 latent frames.
SAME_TINY = {**SAME_S, "patch_size": 16, "strides": (4,), "width": 32, "latent_dim": 16, "encoder_depth": 2,
             "decoder_depth": 2, "head_dim": 16, "chunk_size": 8, "remat": False}

PRESETS = {
    "sao": dict(
        model=dict(channels=128, c_mults=(1, 2, 4, 8, 16), strides=(2, 4, 4, 8, 8), latent_dim=64,
                   bottleneck=dict(type="vae"), remat=True),
        sample_size=65536, batch_size=32, discriminator_filters=64, gen_lr=1.5e-4, disc_lr=3e-4,
        num_steps=1_000_000,
    ),
    "tiny": dict(
        model=dict(channels=16, c_mults=(1, 2, 4, 4), strides=(2, 4, 4, 8), latent_dim=64,
                   bottleneck=dict(type="vae"), remat=False),
        sample_size=16384, batch_size=8, discriminator_filters=8, gen_lr=5e-4, disc_lr=1e-3, num_steps=300,
    ),
    "demo": dict(
        model=dict(channels=16, c_mults=(1, 2, 4, 4), strides=(2, 4, 4, 8), latent_dim=32,
                   bottleneck=dict(type="vae"), remat=False, decoder_upsample="nearest"),
        sample_size=8192, batch_size=4, discriminator_filters=8, gen_lr=1e-3, disc_lr=1e-3, num_steps=1400,
        sample_rate=16000, audio_channels=1,
        training=dict(lr_warmup=0.95, warmup_steps=1400, warmup_mode="full", l1=80.0, mel=0.5,
                      stft_perceptual_weighting=False, checkpoint_every=1400, demo_every=1400, demo_seconds=4.0),
    ),
    "same_s": dict(model=dict(name="same", **SAME_S), sample_size=131072, batch_size=16, discriminator_filters=64,
                   gen_lr=1.5e-4, disc_lr=3e-4, num_steps=1_000_000),
    "same_l": dict(model=dict(name="same", **SAME_L), sample_size=131072, batch_size=16, discriminator_filters=64,
                   gen_lr=1.5e-4, disc_lr=3e-4, num_steps=1_000_000),
    "same_tiny": dict(model=dict(name="same", **SAME_TINY), sample_size=2048, batch_size=4, discriminator_filters=8,
                      gen_lr=5e-4, disc_lr=1e-3, num_steps=300),
    "vq_tiny": dict(
        model=dict(channels=16, c_mults=(1, 2, 4, 4), strides=(2, 4, 4, 8), latent_dim=32,
                   bottleneck=dict(type="rvq", codebook_size=256, num_quantizers=4, codebook_dim=8), remat=False),
        sample_size=16384, batch_size=8, discriminator_filters=8, gen_lr=5e-4, disc_lr=1e-3, num_steps=300,
    ),
}


def oobleck_autoencoder(preset: dict) -> ml_collections.ConfigDict:
    bottleneck = dict(type="vae", codebook_size=1024, num_quantizers=1, codebook_dim=0, commitment_weight=0.25,
                      codebook_weight=1.0)
    bottleneck.update(preset["model"]["bottleneck"])
    return ml_collections.ConfigDict(dict(
        name="oobleck",
        sample_rate=preset.get("sample_rate", 44100),
        in_channels=preset.get("audio_channels", 2),
        out_channels=preset.get("audio_channels", 2),
        channels=preset["model"]["channels"],
        c_mults=preset["model"]["c_mults"],
        strides=preset["model"]["strides"],
        latent_dim=preset["model"]["latent_dim"],
        use_snake=True,
        antialias=False,
        final_tanh=False,
        dtype="float32",  # the reference keeps the VAE in float32 (spec §9.5.8)
        remat=preset["model"]["remat"],
        # Decoder upsampling: "transpose" (SAO's transposed conv; its checkpoints convert) or "nearest" (repeat each
        # step, then a conv: no phase-dependent taps, so no periodic artefact at the latent rate to learn away).
        decoder_upsample=preset["model"].get("decoder_upsample", "transpose"),
        bottleneck=ml_collections.ConfigDict(bottleneck),
    ))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    preset = choose_preset(arg, PRESETS)
    c = stage_config(preset["batch_size"], distributed=True)

    if preset["model"].get("name") == "same":
        c.autoencoder = ml_collections.ConfigDict(dict(
            **preset["model"], sample_rate=preset.get("sample_rate", 44100),
            in_channels=preset.get("audio_channels", 2), out_channels=preset.get("audio_channels", 2),
            dtype="float32", bottleneck=ml_collections.ConfigDict(dict(type="softnorm"))))
    else:
        c.autoencoder = oobleck_autoencoder(preset)

    # EnCodec-style multi-scale STFT discriminator (spec §1.9), built by the training loop; not counted by describe.
    c.discriminator = ml_collections.ConfigDict(dict(
        name="encodec_discriminator",
        filters=preset["discriminator_filters"],
        audio_channels=preset.get("audio_channels", 2),
        n_ffts=SAO_DISCRIMINATOR_FFT_SIZES,
    ))

    # Audio folder and Grain pipeline (see configs/audio_folder.py for the keys shared with every stage). The
    # global batch is `batch_size` above; each process reads batch_size / process_count examples.
    c.data = audio_folder_data(
        sample_rate=c.autoencoder.sample_rate,
        channels=c.autoencoder.in_channels,
        sample_size=preset["sample_size"],  # crop length in samples; a multiple of the downsampling ratio
        shuffle_seed=0,
        # Clips whose relative-path hash falls below this are held out of training (data_pipelines/splits.py);
        # launch.evaluate scores that split and demos reconstruct its first clip.
        heldout_fraction=0.1,
    )
    # A checkpoint (workdir or step directory) to start from with a fresh optimiser; ignored when resuming.
    c.init_from = ""

    training = preset.get("training", {})
    c.training = ml_collections.ConfigDict(dict(
        num_steps=preset["num_steps"],
        # Odd global steps update the discriminator, even steps the generator (spec §1.9); one compiled step does
        # both (musicdiff/training/autoencoder.py).
        generator=ml_collections.ConfigDict(dict(
            optimizer="adamw", learning_rate=preset["gen_lr"], b1=0.8, b2=0.99, eps=1e-8, weight_decay=1e-3)),
        discriminator=ml_collections.ConfigDict(dict(
            optimizer="adamw", learning_rate=preset["disc_lr"], b1=0.8, b2=0.99, eps=1e-8, weight_decay=1e-3)),
        lr_schedule="inverse",  # InverseLR for both optimisers, stepped on each of their updates
        lr_inv_gamma=200000.0,
        lr_power=0.5,
        lr_warmup=training.get("lr_warmup", 0.999),
        final_lr=0.0,
        loss_weights=ml_collections.ConfigDict(dict(
            mrstft=1.0,  # mid/side MR-STFT + 0.5 · (left + right) MR-STFT
            mel=training.get("mel", 0.0),  # mel-scaled MR-STFT (mel_fft_sizes, mel_bins), off in the recipe
            l1=training.get("l1", 0.0),  # time-domain L1, off in the recipe
            adversarial=0.1,
            feature_matching=5.0,
            kl=1e-4,
            quantizer=1.0,  # vq / rvq bottlenecks only
            # SAME's SoftNorm regulariser (softnorm bottleneck only); SA3's weight is unpublished, this is SAO's KL's.
            softnorm=1e-4,
        )),
        stft_fft_sizes=preset.get("stft_fft_sizes", SAO_STFT_FFT_SIZES),
        stft_perceptual_weighting=training.get("stft_perceptual_weighting", True),  # A-weighting FIR pre-filter
        mel_fft_sizes=(2048, 1024),  # the mel term's resolutions (hops fft / 4) and mel bands
        mel_bins=128,
        # Before warmup_steps the generator has no adversarial / feature-matching terms. warmup_mode "adv" (the
        # reference default) still trains the discriminator on odd steps meanwhile; "full" makes every warm-up step
        # a generator step and starts the alternation at warmup_steps.
        warmup_steps=training.get("warmup_steps", 0),
        warmup_mode=training.get("warmup_mode", "adv"),
        encoder_freeze_on_warmup=False,  # after warm-up, keep the encoder fixed and train the decoder only
        ema_decay=0.9999,  # maximum EMA decay (ema_pytorch warm-up, counted in generator updates)
        ema_power=0.75,
        ema_inv_gamma=1.0,
        ema_update_after_step=1,
        grad_clip_norm=0.0,  # 0 = off
        max_nonfinite_steps=5,  # stop after this many consecutive non-finite steps (each is skipped)
        log_every=100 if arg == "sao" else 10,
        checkpoint_every=10_000 if arg == "sao" else training.get("checkpoint_every", 100),
        keep_checkpoints=3,
        save_initial_checkpoint=False,  # also checkpoint step 0: the baseline an evaluation compares against
        preemption_sync_every=10,  # multi-process: steps between combining the processes' SIGTERM flags
        demo_every=2_000 if arg == "sao" else training.get("demo_every", 100),
        demo_seconds=training.get("demo_seconds", 5.0),  # the fixed held-out demo clip: its first seconds
    ))
    return c

"""Adapter fine-tuning configs (launch/train_lora.py, the "lora" trainer: musicdiff/training/lora.py):
`--config=configs/lora.py` (one preset).

    python -m launch.train_lora --config=configs/lora.py --config.init_from=BASE_RUN --config.data.audio=FOLDER \
        --workdir=RUN

The base run (`init_from`, a launch.train_diffusion workdir or checkpoint) decides the model, conditioner, prompt
encoder, objective, window and autoencoder; this config holds what is the adapter run's own:
- lora: the adapter (musicdiff/models/weight_adapters.py): kind "lora" | "dora" | "lora_xs", rank, alpha (0 = rank),
  include / exclude (glob patterns over layer names such as "model/transformer/layers/*/self_attn/to_qkv";
  "conditioner/*" adapts the conditioner's layers too), base_dtype (the frozen base's storage: "float32" or
  "bfloat16"; the adapter stays float32).
- data: `audio` (an audio folder, encoded into WORKDIR/latents with the base's settings) or `latents` (already
  encoded with the base's autoencoder and tokenizer); caption_include / caption_exclude select clips of the folder by
  words of their captions.
- training: Stable Audio 3's LoRA recipe (spec §8.5): AdamW(1e-4, betas 0.9/0.95, wd 0.01), constant learning rate,
  10% CFG dropout, on the diffusion trainer's keys (training.trainable adds patterns to the adapter's own tensors;
  the base is always frozen); the EMA of the adapter is what WORKDIR/adapter.safetensors holds.
- Defaults: rank 16 over every Dense layer of the DiT (add "conditioner/*" to include to adapt the conditioner's layers,
  e.g. an embedded prompt encoder meeting new words), 1000 steps, batch 8.
"""

from pathlib import Path

import ml_collections

from musicdiff.config import choose_preset, load_config, stage_config

PRESETS = {"": dict(rank=16, include=("model/*",), batch_size=8, num_steps=1000, learning_rate=1e-4)}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    preset = choose_preset(arg, PRESETS)
    c = stage_config(preset["batch_size"], distributed=True)
    c.trainer = "lora"
    c.init_from = ""  # the base diffusion run (required)
    c.autoencoder_checkpoint = ""  # "" = the base's
    c.lora = ml_collections.ConfigDict(dict(
        kind="lora",  # "lora" | "dora" | "lora_xs"
        rank=preset["rank"],
        alpha=0.0,  # 0 = rank (scaling 1)
        include=preset["include"],
        exclude=(),
        base_dtype="float32",  # "bfloat16" halves the frozen base's memory; the adapter stays float32
    ))
    # The diffusion trainer's keys (the lora trainer is one), with Stable Audio 3's LoRA recipe and an adapter run's
    # sizes in place of the diffusion presets'.
    c.training = load_config(f"{Path(__file__).with_name('diffusion.py')}:tiny").training
    c.training.update(dict(
        num_steps=preset["num_steps"],
        learning_rate=preset["learning_rate"],
        b2=0.95,
        weight_decay=0.01,
        lr_schedule="constant",
        ema_decay=0.999,
        log_every=25,
        checkpoint_every=100,
        keep_checkpoints=2,
        demo_prompts=(),
    ))
    c.data = ml_collections.ConfigDict(dict(
        audio="",  # an audio folder (manifest.jsonl + files): encoded into WORKDIR/latents first
        latents="",  # or latents made with the base's autoencoder and tokenizer
        caption_include=(),  # keep clips whose caption names one of these words (case-insensitive)
        caption_exclude=(),  # drop clips whose caption names one of these
        latent_length=0,  # set from the base run
        cond_tokens=0,  # set from the base run
        shuffle_seed=0,
    ))
    return c

"""Convert Stable Audio (stable-audio-tools) and Stable Audio 3 checkpoints to musicdiff and back.

Import (writes OUT/autoencoder and, for diffusion models, OUT/diffusion; both ordinary musicdiff checkpoints):
    python -m launch.convert --from=stable_audio --model_config=model_config.json \
        --checkpoint=model.safetensors --workdir=OUT [--t5=DIR_OF_T5_BASE] [--dtype=bfloat16]
    python -m launch.convert --from=stable_audio_3 --model_config=model_config.json \
        --checkpoint=model.safetensors --workdir=OUT [--t5gemma=DIR_OF_T5GEMMA]     (full, or AE-only SAME-S/L)
    python -m launch.convert --from=stable_audio_3 --lora=LORA.safetensors --diffusion=OUT/diffusion --workdir=A
        (an SA3 LoRA file -> A/adapter.safetensors, for launch.generate's --config.adapters)
Export (writes OUT/model.safetensors + OUT/model_config.json in the reference's layout):
    python -m launch.convert --to=stable_audio --diffusion=DIR [--autoencoder=DIR] --workdir=OUT
    python -m launch.convert --to=stable_audio_3 --autoencoder=DIR --workdir=OUT
    python -m launch.convert --to=stable_audio_3 --lora=ADAPTER.safetensors --diffusion=DIR --workdir=OUT
        (a launch.train_lora adapter -> OUT/lora.safetensors, a Stable Audio 3 LoRA file)
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

import launch.common  # noqa: F401  (defines --workdir)
from musicdiff.convert.stage import FORMATS, convert_checkpoint
from musicdiff.errors import ConfigError, DataError

flags.DEFINE_enum("from", None, list(FORMATS), "Import a checkpoint of this format.")
flags.DEFINE_enum("to", None, list(FORMATS), "Export a musicdiff checkpoint to this format.")
flags.DEFINE_string("model_config", None, "Import: the stable-audio-tools model_config.json.")
flags.DEFINE_string("checkpoint", None, "Import: model.safetensors, or a .ckpt state dict (read with weights_only).")
flags.DEFINE_string("t5", None, "Import: local Hugging Face directory of the T5 text encoder (default: the "
                    "t5_model_name of the model config, e.g. t5-base).")
flags.DEFINE_string("t5gemma", None, "Import (stable_audio_3): local Hugging Face directory of the T5Gemma encoder "
                    "(default: the model config's, google/t5gemma-b-b-ul2).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Import: compute dtype of the converted DiT.")
flags.DEFINE_string("diffusion", None, "Export: a musicdiff diffusion checkpoint (workdir or step directory).")
flags.DEFINE_string("autoencoder", None, "Export: the autoencoder checkpoint (default: the diffusion config's "
                    "autoencoder_checkpoint).")
flags.DEFINE_string("lora", None, "stable_audio_3: convert this LoRA file (import: an SA3 LoRA; export: a "
                    "launch.train_lora adapter) against the converted --diffusion checkpoint.")
flags.DEFINE_bool("use_ema", True, "Export: the EMA weights when the checkpoint has them.")
FLAGS = flags.FLAGS


def main(_argv: list[str]) -> None:
    from musicdiff.checkpoints import CheckpointError

    logging.getLogger().setLevel(logging.INFO)
    try:
        convert_checkpoint(workdir=FLAGS.workdir, from_format=FLAGS["from"].value, to_format=FLAGS.to,
                           model_config=FLAGS.model_config, checkpoint=FLAGS.checkpoint, t5=FLAGS.t5,
                           t5gemma=FLAGS.t5gemma,
                           dtype=FLAGS.dtype, diffusion=FLAGS.diffusion, autoencoder=FLAGS.autoencoder,
                           use_ema=FLAGS.use_ema, lora=FLAGS.lora)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

"""python -m launch.train_lora --config=configs/lora.py[:PRESET] --config.init_from=BASE_RUN
       --config.data.audio=FOLDER (or --config.data.latents=DIR) --workdir=RUN

Fine-tunes a weight adapter (LoRA / DoRA / LoRA-XS: --config.lora.kind) on a frozen diffusion run with the shared
stage runner (the "lora" trainer, musicdiff/training/lora.py): sharded like full training, resumable from
RUN/checkpoints, logged to RUN/metrics.jsonl and TensorBoard. Writes RUN/adapter.safetensors at the end; generate with
`launch.generate --config.checkpoint=BASE_RUN --config.adapters=RUN/adapter.safetensors[:STRENGTH]`.
"""

import functools

from launch.common import run
from musicdiff.training.runner import train

if __name__ == "__main__":
    run(functools.partial(train, default_trainer="lora"), default_config="configs/lora.py")

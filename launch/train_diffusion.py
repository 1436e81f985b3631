"""python -m launch.train_diffusion --config=configs/diffusion.py:PRESET --config.data.latents=DIR --workdir=RUN

Trains the denoiser (and its conditioner) on latents written by launch.precompute_latents, with the trainer
`config.trainer` names (default "diffusion"; training/trainer.py). A workdir that already holds checkpoints resumes
from the latest one (data position included); `--config.init_from=CKPT` starts a new run from another run's (or a
converted Stable Audio) weights with a fresh optimiser.
"""

import functools

from launch.common import run
from musicdiff.training.runner import train

if __name__ == "__main__":
    run(functools.partial(train, default_trainer="diffusion"))

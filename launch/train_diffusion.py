"""python -m launch.train_diffusion --config=configs/diffusion.py:PRESET --config.data.latents=DIR --workdir=RUN

Trains the DiT (and its conditioner) on latents written by launch.precompute_latents. A workdir that already holds
checkpoints resumes from the latest one (data position included); `--config.init_from=CKPT` starts a new run from
another run's (or a converted Stable Audio) weights with a fresh optimiser.
"""

from launch.common import run
from musicdiff.training.diffusion import train_diffusion

if __name__ == "__main__":
    run(train_diffusion)

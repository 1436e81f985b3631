"""python -m launch.train_autoencoder --config=configs/autoencoder.py:PRESET --config.data.root=ROOT --workdir=RUN

Trains the Oobleck autoencoder (VAE or VQ) adversarially on an audio folder (musicdiff.training.autoencoder, trainer
"autoencoder"). A workdir that already holds checkpoints resumes from the latest one, data position included;
`--config.init_from=CKPT` starts a new run from another run's (or a converted Stable Audio) weights with fresh
optimisers. Held-out clips (`--config.data.heldout_fraction`) are never trained on; score them afterwards with
`python -m launch.evaluate --config=configs/evaluate.py:autoencoder --config.checkpoint=RUN --config.data.root=ROOT`.
"""

import functools

from launch.common import run
from musicdiff.training.runner import train

if __name__ == "__main__":
    run(functools.partial(train, default_trainer="autoencoder"))

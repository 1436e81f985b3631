"""python -m launch.train_evaluator --config=configs/evaluator.py[:tiny] --config.data.root=ROOT --workdir=DIR

Trains the embedded evaluator (the metric backbone that needs no download) on a synthetic audio folder rendered by
launch.prepare_data; checkpoints in DIR/checkpoints/<step> (section "evaluator"), held-out attribute accuracy in
DIR/heldout_accuracy.json and printed (see musicdiff.training.evaluator, trainer "evaluator"). Rerunning the same
command resumes.
"""

import functools

from launch.common import run
from musicdiff.training.runner import train

if __name__ == "__main__":
    run(functools.partial(train, default_trainer="evaluator"), default_config="configs/evaluator.py")

"""python -m launch.train_evaluator --config=configs/evaluator.py[:tiny] --config.data.root=ROOT --workdir=DIR

Trains the embedded evaluator (the metric backbone that needs no download) on a synthetic audio folder rendered by
launch.prepare_data; checkpoints in DIR/checkpoints/<step> (section "evaluator"), held-out attribute accuracy in
DIR/heldout_accuracy.json (see musicdiff.training.evaluator). Rerunning the same command resumes.
"""

import json

from launch.common import run
from musicdiff.training.evaluator import train_evaluator


def main(config, workdir):
    summary = train_evaluator(config, workdir)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run(main, default_config="configs/evaluator.py")

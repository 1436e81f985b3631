"""python -m launch.evaluate --config=configs/evaluate.py:PRESET --workdir=OUT [--config.KEY=VALUE ...]

Offline evaluation; the config's `kind` picks the stage (configs/evaluate.py lists the presets, musicdiff.eval.stage
says what each writes).
"""

from launch.common import run
from musicdiff.eval.stage import evaluate

if __name__ == "__main__":
    run(evaluate, default_config="configs/evaluate.py")

"""python -m launch.describe --config=configs/<file>.py[:preset] --workdir=DIR

Parameter count per module, total, and per-device bytes under the configured mesh; writes DIR/describe.json.
"""

from launch.common import run
from musicdiff.describe import describe_stage

if __name__ == "__main__":
    run(describe_stage)

"""python -m launch.demo --workdir=demo_out [--config.fast=True]

The whole pipeline on the embedded CC0 set (configs/demo.py; musicdiff.pipeline says what each stage does). Ends with
DEMO/summary.md: where to listen, the spectrograms, and the numbers.
"""

from launch.common import run
from musicdiff.pipeline import run_demo

if __name__ == "__main__":
    run(run_demo, default_config="configs/demo.py", needs_devices=False)

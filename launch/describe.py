"""python -m launch.describe --config=configs/<file>.py[:preset] --workdir=DIR

Parameter count per module, total, and per-device bytes under the configured mesh; writes DIR/describe.json.
"""

import json
from pathlib import Path

import ml_collections

from launch.common import run
from musicdiff.describe import describe_config, format_report


def describe(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    report = describe_config(config)
    print(format_report(report))
    (workdir / "describe.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run(describe)

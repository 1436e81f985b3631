"""python -m launch.inspect_data --config=configs/audio_folder.py --config.root=ROOT --workdir=DIR

Validates an audio folder (see data_pipelines.audio_folder): prints usable clips, the count of each skip reason and the
usable hours, and writes DIR/data_report.json. Bad files are reported, never fatal: the exit code is 0 whenever the
folder and its manifest exist.
"""

import json
from pathlib import Path

import ml_collections

from data_pipelines.audio_folder import ScanResult, scan
from launch.common import run


def format_table(result: ScanResult) -> str:
    rows = [("usable", str(result.usable))]
    rows += [(f"skipped: {reason}", str(count)) for reason, count in result.skipped.items()]
    rows += [("hours (usable)", f"{result.hours:.4f}"), ("audio files not in the manifest", str(len(result.unlisted)))]
    width = max(len(name) for name, _ in rows)
    lines = [f"audio folder {result.root}"] + [f"  {name:<{width}}  {value:>8}" for name, value in rows]
    return "\n".join(lines)


def inspect_data(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    result = scan(config)
    print(format_table(result))
    report = result.report()
    (workdir / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run(inspect_data, default_config=str(Path(__file__).resolve().parents[1] / "configs" / "audio_folder.py"),
        needs_devices=False)

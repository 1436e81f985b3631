"""python -m launch.inspect_data --config=configs/audio_folder.py --config.root=ROOT --workdir=DIR

Validates an audio folder (see data_pipelines.audio_folder): prints usable clips, the count of each skip reason and the
usable hours, and writes DIR/data_report.json. Bad files are reported, never fatal: the exit code is 0 whenever the
folder and its manifest exist.
"""

from pathlib import Path

from data_pipelines.audio_folder import inspect_folder
from launch.common import run

if __name__ == "__main__":
    run(inspect_folder, default_config=str(Path(__file__).resolve().parents[1] / "configs" / "audio_folder.py"),
        needs_devices=False)

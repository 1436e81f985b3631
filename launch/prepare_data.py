"""python -m launch.prepare_data --config=configs/synthetic_data.py[:tiny] --workdir=DIR [--config.num_clips=N]

Renders the synthetic CC0 dataset into the audio folder DIR (DIR/audio/NNNNNN.wav, DIR/manifest.jsonl,
DIR/dataset_info.json; see data_pipelines.synthetic.writer) and prints how many clips and hours it wrote.
"""

import json
from pathlib import Path

import ml_collections

from data_pipelines.synthetic.writer import write_dataset
from launch.common import run


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    summary = write_dataset(config, workdir, progress=True)
    print(f"wrote {summary['clips']} clips ({summary['hours']:.3f} h of audio) to {summary['root']} in "
          f"{summary['seconds_taken']:.1f} s with {summary['workers']} worker(s)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run(prepare_data, default_config="configs/synthetic_data.py", needs_devices=False)

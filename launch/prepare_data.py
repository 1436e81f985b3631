"""python -m launch.prepare_data --config=configs/synthetic_data.py[:tiny] --workdir=DIR [--config.num_clips=N]

Renders the synthetic CC0 dataset into the audio folder DIR (DIR/audio/NNNNNN.wav, DIR/manifest.jsonl,
DIR/dataset_info.json; see data_pipelines.synthetic.writer) and prints how many clips and hours it wrote.
"""

from data_pipelines.synthetic.writer import prepare_dataset
from launch.common import run

if __name__ == "__main__":
    run(prepare_dataset, default_config="configs/synthetic_data.py", needs_devices=False)

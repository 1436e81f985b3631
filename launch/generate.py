"""python -m launch.generate --config=configs/generate.py[:PRESET] --config.checkpoint=RUN --config.prompt="..."
    [--config.prompts_file=F] --config.seconds_total=S --config.steps=N --config.sampler=NAME --config.cfg_scale=W
    --config.seed=K --workdir=OUT

Writes OUT/<n>.wav (trimmed to seconds_total), OUT/<n>.png (spectrogram) and OUT/generations.jsonl.
"""

from launch.common import run
from musicdiff.inference.batch_generation import generate_to_folder

if __name__ == "__main__":
    run(generate_to_folder, default_config="configs/generate.py")

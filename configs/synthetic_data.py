"""Synthetic dataset config: `--config=configs/synthetic_data.py[:tiny]`, rendered by launch/prepare_data.py.

- num_clips, seconds, sample_rate: how many clips, each how long, at what rate (stereo 16-bit WAV).
- seed: base seed; clip i is rendered from seed * 1_000_000 + i (see data_pipelines.synthetic.writer).
- num_workers: rendering processes (0: one per CPU).
- bpm_min, bpm_max, bpm_step: tempo range, inclusive, drawn uniformly from bpm_min, bpm_min + bpm_step, ... <= bpm_max
  (step 1: every whole BPM).
- instruments: the instruments clips may use (a subset of data_pipelines.synthetic.render.ALL_INSTRUMENTS).

Presets: "tiny" (16 clips of 4 s, for tests and smoke runs).
"""

import ml_collections

from data_pipelines.synthetic.render import ALL_INSTRUMENTS
from musicdiff.config import choose_preset

PRESETS = {
    "": {},
    "tiny": dict(num_clips=16, seconds=4.0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_clips = 500
    c.seconds = 10.0
    c.sample_rate = 44100
    c.seed = 0
    c.num_workers = 0
    c.bpm_min = 70
    c.bpm_max = 160
    c.bpm_step = 1
    c.instruments = ALL_INSTRUMENTS
    c.update(choose_preset(arg, PRESETS))
    return c

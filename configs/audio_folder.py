"""Audio-folder data config: `--config=configs/audio_folder.py --config.root=ROOT`.

`root` (top level) is an alias of `data.root` so the folder can be given as `--config.root=ROOT`; when set it wins
over `data.root` (see data_pipelines.audio_folder.data_root). All other data settings live under `data`:

- sample_rate, channels: the model's rate and channel count; files are resampled (soxr HQ) and mixed to it.
- sample_size: samples per training example, a multiple of 2048 (the autoencoder's downsampling ratio).
- license_allowlist: SPDX ids that may be used; a missing licence is never allowed.
- silence_threshold_db: files whose peak is below this (dBFS) are skipped as silent.
- min_seconds: shorter files are skipped; longer ones shorter than sample_size are zero-padded and masked.
- normalize: "none" | "peak" | "loudness" (gain from the whole file's levels, see musicdiff.audio.io).
- random_crop: a random window per example (else the first window).
- shuffle_seed: order of examples; crops use `seed`.
- num_workers: Grain worker processes (0: decode in the main process, with `read_threads` threads).
- batch_size: examples per batch on each process.

Every stage that reads an audio folder starts its `data` section from these defaults
(data_pipelines.audio_folder.audio_folder_data).
"""

import ml_collections

from data_pipelines.audio_folder import audio_folder_data
from musicdiff.config import choose_preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    choose_preset(arg, {"": None})
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.root = ""
    c.data = audio_folder_data(shuffle_seed=0, batch_size=8)
    return c

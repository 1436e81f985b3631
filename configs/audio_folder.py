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
"""

import ml_collections

from data_pipelines.audio_folder import DEFAULT_LICENSE_ALLOWLIST, DEFAULT_MIN_SECONDS, DEFAULT_SILENCE_THRESHOLD_DB


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/audio_folder.py takes no preset, got '{arg}'")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.root = ""
    c.data = ml_collections.ConfigDict(dict(
        root="",
        sample_rate=44100,
        sample_size=131072,  # 2.97 s at 44.1 kHz, 64 * 2048
        channels=2,
        license_allowlist=DEFAULT_LICENSE_ALLOWLIST,
        silence_threshold_db=DEFAULT_SILENCE_THRESHOLD_DB,
        min_seconds=DEFAULT_MIN_SECONDS,
        normalize="none",
        random_crop=True,
        shuffle_seed=0,
        num_workers=0,
        read_threads=2,
        batch_size=8,
    ))
    return c

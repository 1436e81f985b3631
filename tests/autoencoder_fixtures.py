"""Shared pieces of the autoencoder training tests: a very small model config and a rendered audio folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from musicdiff.config import load_config

# An Oobleck of 2 blocks (8x downsampling, 4 and 8 channels, 8 latent channels), a 2-resolution spectral loss and a
# one-scale discriminator: every piece of the recipe, small enough that XLA compiles each step kind in seconds.
SMALL_MODEL = (
    "autoencoder.channels=4", "autoencoder.c_mults=(1, 2)", "autoencoder.strides=(2, 4)", "autoencoder.latent_dim=8",
    "training.stft_fft_sizes=(256, 64)", "discriminator.n_ffts=(256,)", "discriminator.filters=4",
    "data.sample_size=2048", "batch_size=8",
)
CLIP_SECONDS = 1.5


def small_config(*overrides: str) -> ml_collections.ConfigDict:
    return load_config("configs/autoencoder.py:tiny", [*SMALL_MODEL, *overrides])


def render_folder(root: Path, clips: int = 8, seconds: float = CLIP_SECONDS) -> Path:
    """The embedded synthetic set (what launch.prepare_data renders), `clips` clips of `seconds`."""
    from data_pipelines.synthetic.writer import write_dataset

    config = load_config("configs/synthetic_data.py:tiny", [f"num_clips={clips}", f"seconds={seconds}",
                                                            "num_workers=1"])
    write_dataset(config, root)
    return root


@contextlib.contextmanager
def compilation_cache(directory: Path, min_compile_time_s: float = 0.0) -> Iterator[Path]:
    """JAX's persistent compilation cache in `directory` while the block runs (later identical programs, in this
    process or in subprocesses given JAX_COMPILATION_CACHE_DIR, load instead of compiling); programs compiled in
    under `min_compile_time_s` are not written."""
    from jax.experimental.compilation_cache import compilation_cache as cache

    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    try:
        yield directory
    finally:
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
        cache.reset_cache()

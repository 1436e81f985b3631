"""Inpainting and continuation at generation: the trained input or the RePaint-style fallback, and mask files.

`launch.generate` regenerates part of `inpaint_audio` (its latents are the known region) where a mask says so:
`mask="start:end,..."` in seconds (continuation: "T:" keeps the first T seconds and generates the rest of the window),
or `mask_file`, a .npy of one 0/1 value per latent frame (shape [latent_length], 1 = keep, 0 = generate; the same
convention as training, diffusion/inpainting_masks.py).

Two methods, chosen by what the model declares (models/denoiser.py):
- "trained_input" (LOCAL_CONDITIONING, a model trained with the inpainting input): every denoiser call gets
  `local_cond` = concat([keep, known · keep], channels) (the CFG batch's halves alike), and the sampler runs from
  pure noise with no merge between steps, as Stable Audio 3 (spec §5); the known latents are pasted back over the
  kept frames once at the end (as SA3's MLX and TensorRT ports; its PyTorch code returns the model's own frames
  there, which drifted from the given audio by 10.1 dB of log-mel against the autoencoder's own 7.3 on the demo).
- "repaint_fallback" (any other model): the known region is re-noised to each level and merged after every step
  (samplers' `Inpaint`, RePaint without resampling).
- "trained_input_merge" (`inpainting="trained_merge"`, models with the input): both, the trained input at every
  call and the merge after every step, as SA3's TensorRT port pastes the known latents back after each step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from musicdiff.errors import ConfigError

TRAINED_INPUT = "trained_input"
REPAINT_FALLBACK = "repaint_fallback"
TRAINED_MERGE = "trained_input_merge"
NOTES = {
    TRAINED_INPUT: "the model was trained with the inpainting input: it is given the mask and the known latents at "
                   "every step and samples from pure noise; the known latents are pasted back over the kept frames at "
                   "the end",
    REPAINT_FALLBACK: "the model was not trained for inpainting; known latents are re-noised and merged after every "
                      "sampler step (RePaint without resampling)",
    TRAINED_MERGE: "the model was trained with the inpainting input: it is given the mask and the known latents at "
                   "every step, and the known latents are also re-noised and merged after every sampler step",
}


def local_inpaint_input(known: jax.Array, regenerate: jax.Array) -> jax.Array:
    """The denoiser's `local_cond` [B, C + 1, L] from known latents [B, C, L] and the regenerate mask (1 = generate,
    0 = keep; [B, 1, L] or [B, L], the samplers' `Inpaint` convention): concat([keep, known · keep])."""
    regenerate = jnp.asarray(regenerate, known.dtype)
    if regenerate.ndim == 2:
        regenerate = regenerate[:, None, :]
    keep = jnp.broadcast_to(1.0 - regenerate, (known.shape[0], 1, known.shape[2]))
    return jnp.concatenate([keep, known * keep], axis=1)


def mask_from_file(path: str, frames: int) -> np.ndarray:
    """A mask file (.npy, [frames] of 0/1, 1 = keep) as the regenerate mask [frames] float32 (1 = generate)."""
    file = Path(path)
    if file.suffix != ".npy" or not file.is_file():
        raise ConfigError(f"config.mask_file={path}: expected an existing .npy file of {frames} values, one per "
                          f"latent frame (1 = keep, 0 = generate)")
    keep = np.load(file, allow_pickle=False)
    if keep.shape != (frames,):
        raise ConfigError(f"config.mask_file={path}: has shape {keep.shape}; this model generates {frames} latent "
                          f"frames, so the mask needs shape ({frames},) (1 = keep, 0 = generate)")
    if not np.all((keep == 0) | (keep == 1)):
        raise ConfigError(f"config.mask_file={path}: values must be 0 (generate) or 1 (keep)")
    if keep.all():
        raise ConfigError(f"config.mask_file={path}: keeps every frame; mark the frames to generate with 0")
    return (1.0 - keep).astype(np.float32)


__all__ = ["NOTES", "REPAINT_FALLBACK", "TRAINED_INPUT", "local_inpaint_input", "mask_from_file"]

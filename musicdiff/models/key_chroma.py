"""Key conditioning: the prompt's key as pitch-class features on every frame (a frame conditioner,
models/frame_conditioner.py).

The demo's DiT learnt the tonic from caption words but not the mode (mode accuracy at chance: "minor" and "major" are
one token apart and the difference is one scale degree). Mustango conditions its denoiser on chords for the same
reason. Features, constant over the window:

    [0:12]  the scale's pitch classes from the tonic (major 0 2 4 5 7 9 11, natural minor 0 2 3 5 7 8 10)
    [12:24] the tonic triad (root, third: 4 major / 3 minor semitones, fifth), the chord that tells the modes apart
    [24]    1 where the key is known

Inputs: `{"tonic": [B] pitch class (C = 0), "mode": [B] 0 major / 1 minor}`, −1 where unknown (all-zero features).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from musicdiff.models.frame_conditioner import FrameConditioner

SCALES = np.array([[1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1],   # major
                   [1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0]], np.float32)  # natural minor
TRIADS = np.array([[1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0],
                   [1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]], np.float32)
CHANNELS = 25


def key_features(tonic: jax.Array, mode: jax.Array) -> jax.Array:
    """[B] tonics and modes -> [B, 25] (see the module docstring)."""
    tonic = jnp.asarray(tonic, jnp.int32).reshape(-1)
    mode = jnp.asarray(mode, jnp.int32).reshape(-1)
    known = (tonic >= 0) & (mode >= 0)
    m = jnp.clip(mode, 0, 1)
    # Pitch class p belongs to the key when (p - tonic) mod 12 is a degree of the mode's template.
    degrees = (jnp.arange(12)[None, :] - tonic[:, None]) % 12
    scale = jnp.take_along_axis(jnp.asarray(SCALES)[m], degrees, axis=1)
    triad = jnp.take_along_axis(jnp.asarray(TRIADS)[m], degrees, axis=1)
    features = jnp.concatenate([scale, triad, jnp.ones_like(scale[:, :1])], axis=1)
    return features * known[:, None].astype(features.dtype)


class KeyChromaConditioner(FrameConditioner):
    """`{"tonic", "mode"}` -> (features [B, 25, frames], known [B] bool); no parameters."""

    kind = "key_chroma"

    def __init__(self, frames: int, frame_rate: float, dropout: float = 0.0):
        super().__init__(frames, frame_rate, dropout, CHANNELS)

    def __call__(self, inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        self.check_window()
        features = key_features(inputs["tonic"], inputs["mode"])
        known = features[:, -1] > 0
        return jnp.broadcast_to(features[:, :, None], (*features.shape, self.frames)), known


__all__ = ["CHANNELS", "KeyChromaConditioner", "key_features"]

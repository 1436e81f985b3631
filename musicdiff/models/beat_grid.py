"""Beat-grid conditioning: a tempo as frame-aligned features, so the denoiser knows where beats fall.

A text encoder sees a tempo as a token ("120"). Turning that into an onset every 0.5 s asks the denoiser to multiply a
tempo by a position, which the demo's DiT did not learn in its budget (nor with number-aware tokens or absolute
positions: configs/diffusion.py). Music models that follow tempo give the denoiser the beat grid itself: Mustango
conditions on beat positions, MuseControlLite's rhythm control is frame-aligned. This conditioner computes that grid
from a tempo and a beat time and is routed into the denoiser's input channels (`input_concat_cond_ids`, as
stable-audio-tools' input concatenation), so onsets become a function of the features of the frame they sit in.

    grid[b, 2i, j], grid[b, 2i + 1, j] = cos, sin of 2π · harmonics[i] · bpm_b / 60 · (j / frame_rate − beat_offset_b)
    grid[b, -1, j] = 1 where the tempo is known (bpm > 0); an unknown tempo gives all zeros

Harmonic 1 is the beat; 1/4 a 4/4 bar, 2 and 4 eighth and sixteenth notes. `beat_offset` is the time in seconds,
relative to the window's start, of any beat (training windows cropped s seconds into a clip that starts on a beat
have beat_offset = −s). Inputs: `{"bpm": [B], "beat_offset": [B]}`.
At generation the tempo comes from the prompt's text ("128 BPM", "90 beats per minute": `prompt_bpm`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from musicdiff.errors import ConfigError
from musicdiff.models.frame_conditioner import FrameConditioner

DEFAULT_HARMONICS = (0.25, 0.5, 1.0, 2.0, 4.0)
_BPM_TEXT = re.compile(r"(\d{2,3}(?:\.\d+)?)\s*(?:bpm|beats per minute)", re.IGNORECASE)


def prompt_bpm(text: str) -> float:
    """The tempo a prompt names ("128 BPM", "128bpm", "90 beats per minute"); 0.0 when it names none."""
    match = _BPM_TEXT.search(text)
    return float(match.group(1)) if match else 0.0


def beat_grid(bpm: jax.Array, beat_offset: jax.Array, frames: int, frame_rate: float,
              harmonics: Sequence[float] = DEFAULT_HARMONICS) -> jax.Array:
    """[B] tempi and beat times -> [B, 2·len(harmonics) + 1, frames] (see the module docstring)."""
    bpm = jnp.asarray(bpm, jnp.float32).reshape(-1)
    offset = jnp.broadcast_to(jnp.asarray(beat_offset, jnp.float32).reshape(-1), bpm.shape)
    times = jnp.arange(frames, dtype=jnp.float32) / float(frame_rate)
    beats = (times[None, :] - offset[:, None]) * (bpm[:, None] / 60.0)  # [B, frames], in beats
    # The phase mod 1 before scaling keeps float32 exact over long windows.
    scaled = jnp.asarray(harmonics, jnp.float32)[None, :, None] * beats[:, None, :]
    phase = 2 * math.pi * (scaled - jnp.floor(scaled))
    known = (bpm > 0).astype(jnp.float32)[:, None, None]
    waves = jnp.stack([jnp.cos(phase), jnp.sin(phase)], axis=2).reshape(bpm.shape[0], -1, frames)
    return jnp.concatenate([waves, jnp.ones_like(waves[:, :1])], axis=1) * known


def grid_channels(harmonics: Sequence[float]) -> int:
    return 2 * len(harmonics) + 1


class BeatGridConditioner(FrameConditioner):
    """`{"bpm", "beat_offset"}` -> (grid [B, F, frames], known [B] bool); no parameters
    (models/frame_conditioner.py)."""

    kind = "beat_grid"

    def __init__(self, frames: int, frame_rate: float, harmonics: Sequence[float] = DEFAULT_HARMONICS,
                 dropout: float = 0.0):
        if not harmonics or any(h <= 0 for h in harmonics):
            raise ConfigError(f"beat_grid conditioner: harmonics={list(harmonics)} must be positive beats-per-cycle")
        super().__init__(frames, frame_rate, dropout, grid_channels(harmonics))
        self.harmonics = tuple(float(h) for h in harmonics)

    def __call__(self, inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        self.check_window()
        bpm = jnp.asarray(inputs["bpm"], jnp.float32).reshape(-1)
        offset = inputs.get("beat_offset", jnp.zeros_like(bpm))
        return beat_grid(bpm, offset, self.frames, self.frame_rate, self.harmonics), bpm > 0


__all__ = ["DEFAULT_HARMONICS", "BeatGridConditioner", "beat_grid", "grid_channels", "prompt_bpm"]

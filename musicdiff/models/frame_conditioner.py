"""Frame conditioners: what a prompt states about the music, as features per latent frame.

They are routed by MultiConditioner's `input_concat_cond_ids` into the denoiser's input channels (stable-audio-tools'
input concatenation), so a musical fact reaches every token directly instead of through text tokens the denoiser
must learn to read. Each one maps its inputs to (features [B, channels, frames], known [B] bool): an unknown value
gives all-zero features, and training hides a sample's features with probability `dropout` so that generation from
prompts that state nothing stays in distribution. Every kind spans the denoiser's window, `frames` latent frames at
`frame_rate` frames per second (training fills both from the latents: training/diffusion.py), 0 until then; its
`channels` is fixed by its own options.
Kinds: beat_grid (models/beat_grid.py), key_chroma (models/key_chroma.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from musicdiff.errors import ConfigError


class FrameConditioner(nnx.Module):
    kind = ""

    def __init__(self, frames: int, frame_rate: float, dropout: float, channels: int):
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{self.kind} conditioner: dropout={dropout} must be in [0, 1)")
        self.frames, self.frame_rate, self.dropout = int(frames), float(frame_rate), float(dropout)
        self.channels = int(channels)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FrameConditioner:
        """From a conditioning entry's `config`: frames, frame_rate, dropout and the kind's own options."""
        options = {k: v for k, v in config.items() if k not in ("frames", "frame_rate")}
        try:
            return cls(config.get("frames", 0), config.get("frame_rate", 0.0), **options)
        except TypeError as error:
            raise ConfigError(f"{cls.kind} conditioner config {dict(config)}: {error}") from None

    def check_window(self) -> None:
        """Raises unless training has filled in the window."""
        if self.frames <= 0 or self.frame_rate <= 0:
            raise ConfigError(f"{self.kind} conditioner: frames={self.frames}, frame_rate={self.frame_rate}: must be "
                              f"positive (training fills them from the latents manifest)")


__all__ = ["FrameConditioner"]

"""Frame conditioners: what a prompt states about the music, as features per latent frame.

They are routed by MultiConditioner's `input_concat_cond_ids` into the denoiser's input channels (stable-audio-tools'
input concatenation), so a musical fact reaches every token directly instead of through text tokens the denoiser
must learn to read. Each one maps its inputs to (features [B, channels, frames], known [B] bool): an unknown value
gives all-zero features, and training hides a sample's features with probability `dropout` so that generation from
prompts that state nothing stays in distribution. `frames` is the denoiser's window (training fills it, with
`frame_rate`, from the latents: configs/diffusion.py, training/diffusion.py), 0 until then.
Kinds: beat_grid (models/beat_grid.py), key_chroma (models/key_chroma.py).
"""

from __future__ import annotations

from flax import nnx

from musicdiff.errors import ConfigError


class FrameConditioner(nnx.Module):
    kind = ""

    def __init__(self, frames: int, dropout: float):
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{self.kind} conditioner: dropout={dropout} must be in [0, 1)")
        self.frames, self.dropout = int(frames), float(dropout)

    @property
    def channels(self) -> int:
        raise NotImplementedError

    def check_window(self, **positive: float) -> None:
        """Raises unless the window (and what else the kind needs, e.g. frame_rate) has been filled in."""
        values = dict(frames=self.frames, **positive)
        if any(v <= 0 for v in values.values()):
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            raise ConfigError(f"{self.kind} conditioner: {shown}: must be positive (training fills them from the "
                              f"latents manifest)")


__all__ = ["FrameConditioner"]

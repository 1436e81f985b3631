"""The one small interface every metric backbone offers, and the preprocessing the Stable Audio protocol shares.

A backbone is built from its config section (musicdiff.eval.backbones.build_backbone) and offers:
- `id`: names the backbone and every setting that changes its numbers (reports and statistics files carry it;
  numbers of different ids are never compared);
- `sample_rate`, `channels`, `window_seconds`, `hop_seconds`: what it wants and how it frames audio;
- `prepare(audio, rate)`: file audio -> the backbone's input (peak-normalised to -1 dBFS as every SA metric does,
  resampled with soxr HQ, channel policy);
- `analyze(clips)`: prepared clips -> one ClipAnalysis each: frame embeddings [frames, D] for FD, optionally label
  distributions per label group (KL) and a joint audio embedding (CLAP score);
- `embed_text(prompts)` when `has_text`: [N, D] text embeddings in the joint space.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import numpy as np

from musicdiff.audio.windows import prepare_for_analysis
from musicdiff.errors import ConfigError

@dataclasses.dataclass
class ClipAnalysis:
    frames: np.ndarray  # [frames, D] embeddings
    label_probs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # group -> [K] distribution
    joint_embedding: np.ndarray | None = None  # [D] audio embedding in the text/audio space
    predictions: dict[str, object] = dataclasses.field(default_factory=dict)  # attribute predictions, if any


class Backbone(abc.ABC):
    id: str
    sample_rate: int
    channels: int = 1
    window_seconds: float = 1.0
    hop_seconds: float = 0.5
    label_groups: tuple[str, ...] = ()
    has_text: bool = False
    normalize_before_resample: bool = False  # OpenL3 in SA: peak-normalise at the file rate, then resample

    @property
    def has_labels(self) -> bool:
        return bool(self.label_groups)

    def prepare(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """[channels, samples] file audio -> float32 [self.channels, samples'] at self.sample_rate."""
        return prepare_for_analysis(audio, sample_rate, self.sample_rate, self.channels,
                                    normalize_before_resample=self.normalize_before_resample)

    @abc.abstractmethod
    def analyze(self, clips: Sequence[np.ndarray]) -> list[ClipAnalysis]:
        """Prepared clips -> their analyses (see the module docstring)."""

    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        raise ConfigError(f"backbone '{self.id}' has no text tower; choose a backbone with text (clap) for the "
                          f"CLAP score, or set config.clap_backbone=''")

    def close(self) -> None:
        """Releases models or worker processes."""

    def describe(self) -> dict[str, object]:
        return dict(id=self.id, sample_rate=self.sample_rate, channels=self.channels,
                    window_seconds=self.window_seconds, hop_seconds=self.hop_seconds,
                    label_groups=list(self.label_groups), has_text=self.has_text)

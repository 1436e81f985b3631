"""The embedded evaluator as a metric backbone: no download, trained by launch.train_evaluator.

Protocol: audio at the evaluator's rate (16 kHz), mono, peak-normalised to -1 dBFS, cut into `window_seconds`
windows every `hop_seconds` (musicdiff.audio.windows.window_starts; musicdiff.models.evaluator_analysis). Per window the network gives an
embedding (FD frames, pooled over every window of every clip like OpenL3's) and logits per head. Per clip, as
PaSST in stable-audio-metrics: the logits are averaged over windows and a softmax per head gives the label
distribution for KL (groups key, mode, tempo, instruments; instruments as a softmax over instrument logits, the
SA convention for multi-label taggers). Attribute predictions use the argmax of key/mode/tempo and the sigmoid
of the window-mean instrument logits >= 0.5.

The id names the checkpoint's content fingerprint: statistics of another evaluator checkpoint are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from musicdiff.errors import ConfigError
from musicdiff.eval.backbones.base import Backbone, ClipAnalysis
from musicdiff.models.evaluator_analysis import WindowedEvaluator
from musicdiff.models.evaluator_labels import HEADS


class EmbeddedBackbone(Backbone):
    normalize_before_resample = False

    def __init__(self, model: Any, model_config: Any, tag: str):
        self.model_config = model_config
        self.sample_rate = int(model_config.sample_rate)
        self.channels = 1
        self.window_seconds = float(model_config.window_seconds)
        self.hop_seconds = float(model_config.hop_seconds)
        self.label_groups = HEADS
        self.id = f"embedded-evaluator-{tag}"
        self.evaluator = WindowedEvaluator(model, model_config)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> EmbeddedBackbone:
        """The evaluator of a launch.train_evaluator workdir (its latest step) or of one step directory."""
        from musicdiff.checkpoints import find_checkpoint, load_model
        from musicdiff.checkpoints import CheckpointError

        if not str(path):
            raise ConfigError("config.backbones.embedded.checkpoint is empty: train the embedded evaluator with "
                              "`python -m launch.train_evaluator --config=configs/evaluator.py "
                              "--config.data.root=ROOT --workdir=DIR` and pass DIR")
        try:
            ref = find_checkpoint(path)
            if "evaluator" not in ref.config:
                raise ConfigError(f"config.backbones.embedded.checkpoint={path}: not an evaluator checkpoint (its "
                                  f"config has no 'evaluator' section); pass a launch.train_evaluator workdir")
            model = load_model(ref, "evaluator")
        except CheckpointError as err:
            raise ConfigError(f"config.backbones.embedded.checkpoint={path}: {err}") from None
        return cls(model, ref.config.evaluator, f"{ref.fingerprint()[:12]}")

    def window_outputs(self, clip: np.ndarray) -> dict[str, np.ndarray]:
        """Per-window network outputs of one prepared clip: {embedding [W, D], key [W, 12], ...}."""
        return self.evaluator.window_outputs(clip)

    def analyze(self, clips: Sequence[np.ndarray]) -> list[ClipAnalysis]:
        results = []
        for clip in clips:
            outputs = self.evaluator.clip_outputs(clip)
            results.append(ClipAnalysis(frames=outputs.embeddings, label_probs=outputs.label_probs,
                                        predictions=outputs.predictions))
        return results

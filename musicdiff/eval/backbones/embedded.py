"""The embedded evaluator as a metric backbone: no download, trained by launch.train_evaluator.

Protocol: audio at the evaluator's rate (16 kHz), mono, peak-normalised to -1 dBFS, cut into `window_seconds`
windows every `hop_seconds` (musicdiff.eval.backbones.base.window_starts). Per window the network gives an
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
from musicdiff.eval.attribute_labels import HEADS, decode_predictions
from musicdiff.eval.backbones.base import Backbone, ClipAnalysis, cut_windows

_MAX_BATCH = 32  # windows per forward call; calls are padded to a power of two, so few shapes compile


class EmbeddedBackbone(Backbone):
    normalize_before_resample = False

    def __init__(self, model: Any, model_config: Any, tag: str):
        import jax
        from flax import nnx

        self.model_config = model_config
        self.sample_rate = int(model_config.sample_rate)
        self.channels = 1
        self.window_seconds = float(model_config.window_seconds)
        self.hop_seconds = float(model_config.hop_seconds)
        self.label_groups = HEADS
        self.id = f"embedded-evaluator-{tag}"
        graphdef, params = nnx.split(model)
        self._params = params
        self._forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

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
        window = int(round(self.window_seconds * self.sample_rate))
        hop = max(1, int(round(self.hop_seconds * self.sample_rate)))
        windows = cut_windows(clip, window, hop)
        count = len(windows)
        batch = min(_MAX_BATCH, 1 << max(0, (count - 1).bit_length()))
        padded = np.concatenate([windows, np.zeros((-count % batch,) + windows.shape[1:], np.float32)])
        chunks = [self._forward(self._params, padded[i:i + batch]) for i in range(0, len(padded), batch)]
        return {name: np.concatenate([np.asarray(c[name]) for c in chunks])[:count] for name in chunks[0]}

    def analyze(self, clips: Sequence[np.ndarray]) -> list[ClipAnalysis]:
        from scipy.special import expit, softmax

        results = []
        for clip in clips:
            outputs = self.window_outputs(clip)
            mean_logits = {head: outputs[head].astype(np.float64).mean(axis=0) for head in HEADS}
            probs = {head: softmax(mean_logits[head]) for head in HEADS}
            predictions = decode_predictions(probs, expit(mean_logits["instruments"]), self.model_config)
            results.append(ClipAnalysis(frames=outputs["embedding"].astype(np.float64), label_probs=probs,
                                        predictions=predictions))
        return results

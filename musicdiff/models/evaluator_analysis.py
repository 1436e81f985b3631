"""The embedded evaluator applied to whole clips, as evaluation and the evaluator's trainer both score them.

A prepared clip (mono at the evaluator's rate, peak-normalised: musicdiff.audio.windows.prepare_for_analysis) is cut
into `window_seconds` windows every `hop_seconds`; per window the network gives an embedding and logits per head. Per
clip the logits are averaged over windows and a softmax per head gives the label distribution; predictions are the
argmax of key/mode/tempo and the sigmoid of the window-mean instrument logits >= 0.5.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from scipy.special import expit, softmax

from musicdiff.audio.windows import cut_windows
from musicdiff.models.evaluator_labels import HEADS, decode_predictions

_MAX_BATCH = 32  # windows per forward call; calls are padded to a power of two, so few shapes compile


@dataclasses.dataclass
class ClipOutputs:
    embeddings: np.ndarray  # [windows, D]
    label_probs: dict[str, np.ndarray]  # head -> [K] distribution of the window-mean logits
    predictions: dict[str, Any]


class WindowedEvaluator:
    def __init__(self, model: nnx.Module, model_config: Any):
        self.model_config = model_config
        self.sample_rate = int(model_config.sample_rate)
        self.window = int(round(float(model_config.window_seconds) * self.sample_rate))
        self.hop = max(1, int(round(float(model_config.hop_seconds) * self.sample_rate)))
        graphdef, self._params = nnx.split(model)
        self._forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

    def window_outputs(self, clip: np.ndarray) -> dict[str, np.ndarray]:
        """Per-window network outputs of one prepared clip: {embedding [W, D], key [W, 12], ...}."""
        windows = cut_windows(clip, self.window, self.hop)
        count = len(windows)
        batch = min(_MAX_BATCH, 1 << max(0, (count - 1).bit_length()))
        padded = np.concatenate([windows, np.zeros((-count % batch,) + windows.shape[1:], np.float32)])
        chunks = [self._forward(self._params, padded[i:i + batch]) for i in range(0, len(padded), batch)]
        return {name: np.concatenate([np.asarray(c[name]) for c in chunks])[:count] for name in chunks[0]}

    def clip_outputs(self, clip: np.ndarray) -> ClipOutputs:
        outputs = self.window_outputs(clip)
        mean_logits = {head: outputs[head].astype(np.float64).mean(axis=0) for head in HEADS}
        probs = {head: softmax(mean_logits[head]) for head in HEADS}
        predictions = decode_predictions(probs, expit(mean_logits["instruments"]), self.model_config)
        return ClipOutputs(outputs["embedding"].astype(np.float64), probs, predictions)

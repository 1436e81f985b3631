"""The SA-protocol backbones (OpenL3, PaSST, LAION-CLAP) behind the Backbone interface.

Each wraps an engine of musicdiff.eval.backbones.external, built in this process (its package installed here) or,
when the config names a `python`, in a worker process of that interpreter (musicdiff.eval.backbones.worker).
Engines are built on first use, so configuring a backbone costs nothing until a metric needs it, and a missing
package or weight file is reported (as ConfigError) when it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from musicdiff.errors import ConfigError
from musicdiff.eval.backbones.base import Backbone, ClipAnalysis
from musicdiff.eval.backbones.external import ENGINES, MissingBackbone
from musicdiff.eval.scores import window_logits_to_probs

_ENGINE_PATH = "musicdiff.eval.backbones.external:{}"


class ReferenceBackbone(Backbone):
    def __init__(self, name: str, engine_kwargs: dict[str, Any], python: str = "", *, id: str, sample_rate: int,
                 channels: int, window_seconds: float, hop_seconds: float, label_groups: tuple[str, ...] = (),
                 has_text: bool = False, normalize_before_resample: bool = False, chunk: int = 16):
        self.name, self.engine_kwargs, self.python = name, dict(engine_kwargs), python
        self.id, self.sample_rate, self.channels = id, int(sample_rate), int(channels)
        self.window_seconds, self.hop_seconds = float(window_seconds), float(hop_seconds)
        self.label_groups, self.has_text = tuple(label_groups), bool(has_text)
        self.normalize_before_resample = normalize_before_resample
        self.chunk = max(1, int(chunk))
        self._engine = None

    def engine(self) -> Any:
        if self._engine is None:
            try:
                if self.python:
                    from musicdiff.eval.backbones.worker import WorkerEngine

                    self._engine = WorkerEngine(self.python, _ENGINE_PATH.format(ENGINES[self.name].__name__),
                                                self.engine_kwargs)
                else:
                    self._engine = ENGINES[self.name](**self.engine_kwargs)
            except MissingBackbone as err:
                raise ConfigError(f"backbone '{self.name}': {err}") from None
        return self._engine

    def analyze(self, clips: Sequence[np.ndarray]) -> list[ClipAnalysis]:
        results = []
        for start in range(0, len(clips), self.chunk):  # one worker call per chunk keeps its files small
            try:
                outputs = self.engine().analyze(list(clips[start:start + self.chunk]))
            except MissingBackbone as err:
                raise ConfigError(f"backbone '{self.name}': {err}") from None
            for out in outputs:
                probs = {name.split(":", 1)[1]: window_logits_to_probs(value)
                         for name, value in out.items() if name.startswith("logits:")}
                results.append(ClipAnalysis(frames=np.asarray(out["frames"], np.float64), label_probs=probs,
                                            joint_embedding=out.get("joint")))
        return results

    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        if not self.has_text:
            return super().embed_text(prompts)
        return np.asarray(self.engine().embed_text(list(prompts)), np.float64)


def openl3(cfg: Any) -> ReferenceBackbone:
    channels = int(cfg.channels)
    if channels not in (1, 2):
        raise ConfigError(f"config.backbones.openl3.channels={channels}: 1 (512-d) or 2 (L/R concatenated, 1024-d)")
    kwargs = dict(weights=str(cfg.weights), content_type=str(cfg.content_type), input_repr="mel256",
                  embedding_size=512, hop_seconds=float(cfg.hop_seconds), sample_rate=int(cfg.sample_rate))
    tag = f"openl3-mel256-{cfg.content_type}-512-{int(cfg.sample_rate)}hz-{'stereo' if channels == 2 else 'mono'}" \
          f"-hop{float(cfg.hop_seconds):g}"
    return ReferenceBackbone("openl3", kwargs, str(cfg.python), id=tag, sample_rate=int(cfg.sample_rate),
                             channels=channels, window_seconds=1.0, hop_seconds=float(cfg.hop_seconds),
                             normalize_before_resample=True)


def passt(cfg: Any) -> ReferenceBackbone:
    kwargs = dict(weights=str(cfg.weights), device=str(cfg.device))
    return ReferenceBackbone("passt", kwargs, str(cfg.python), id="passt-s-swa-p16-128-ap476-32000hz-mean-softmax",
                             sample_rate=32000, channels=1, window_seconds=10.0, hop_seconds=5.0,
                             label_groups=("audioset",))


def clap(cfg: Any) -> ReferenceBackbone:
    kwargs = dict(weights=str(cfg.weights), roberta_dir=str(cfg.roberta_dir), device=str(cfg.device),
                  seed=int(cfg.seed))
    stem = Path(str(cfg.weights)).stem or "unset"
    return ReferenceBackbone("clap", kwargs, str(cfg.python), id=f"laion-clap-{stem}-48000hz", sample_rate=48000,
                             channels=1, window_seconds=10.0, hop_seconds=10.0, has_text=True)

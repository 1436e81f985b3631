"""Metric backbones behind one interface (base.Backbone), built by name from `config.backbones.<name>`.

- embedded: the embedded evaluator (no download; launch.train_evaluator), FD + KL + attribute accuracy;
- openl3: FD_openl3 (mel256, music, 512-d per channel, 44.1 kHz, hop 0.5 s), local .h5 weights;
- passt: KL_passt (PaSST-S SWA, 32 kHz, 10-s windows every 5 s), local .pt weights;
- clap: CLAP score (LAION-CLAP 630k-audioset-fusion-best.pt, 48 kHz) with a local roberta-base directory.
This module imports no backbone package: each is imported when its backbone is first used.
"""

from __future__ import annotations

from typing import Any

from musicdiff.errors import ConfigError

BACKBONE_NAMES = ("embedded", "openl3", "passt", "clap")


def build_backbone(name: str, backbones_config: Any) -> Any:
    """The Backbone `name` configured by `backbones_config[name]`."""
    if name not in BACKBONE_NAMES:
        raise ConfigError(f"backbone '{name}': unknown; choose one of {', '.join(BACKBONE_NAMES)}")
    if name not in backbones_config:
        raise ConfigError(f"config.backbones.{name} is missing; add its section (see configs/evaluate.py)")
    cfg = backbones_config[name]
    if name == "embedded":
        from musicdiff.eval.backbones.embedded import EmbeddedBackbone

        return EmbeddedBackbone.from_checkpoint(str(cfg.checkpoint))
    from musicdiff.eval.backbones import reference

    return getattr(reference, name)(cfg)

"""Fold weight adapters into a diffusion checkpoint, for export or for serving without adapter code.

    python -m launch.merge_adapters --checkpoint=BASE_RUN --adapters=RUN/adapter.safetensors[:STRENGTH],... \
        --workdir=OUT

OUT is an ordinary diffusion checkpoint (OUT/checkpoints/<step>, params/{model, conditioner} in the base's dtypes,
the base's config with the merge recorded under `merged_adapters`): launch.generate runs it as it is and
`launch.convert --to=stable_audio --diffusion=OUT` exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ml_collections
from flax import nnx

from musicdiff.checkpoints import Checkpointer, find_checkpoint, load_model
from musicdiff.config import to_dict
from musicdiff.errors import ConfigError
from musicdiff.models.weight_adapters import load_adapter, merge_adapters

SECTIONS = ("model", "conditioner")


def merge_into_checkpoint(checkpoint: str, specs: Sequence[tuple[str, float]], workdir: str | Path, *,
                          use_ema: bool = True) -> Path:
    """Writes WORKDIR/checkpoints/<base step> with the adapters (path, strength), in order, merged; returns WORKDIR."""
    if not specs:
        raise ConfigError("--adapters is empty: pass FILE[:STRENGTH],... (launch.train_lora's adapter.safetensors)")
    ref = find_checkpoint(checkpoint)
    modules = {name: load_model(ref, name, prefer_ema=use_ema) for name in SECTIONS}
    loaded = [load_adapter(path, modules, strength=strength) for path, strength in specs]
    params = merge_adapters({name: nnx.state(module, nnx.Param) for name, module in modules.items()},
                            [entry for entry, _ in loaded], [weights for _, weights in loaded])
    config = ml_collections.ConfigDict(to_dict(ref.config))
    config.merged_adapters = [{"path": str(Path(path).resolve()), "strength": float(strength)}
                              for path, strength in specs]
    workdir = Path(workdir)
    with Checkpointer(workdir / "checkpoints", save_interval_steps=1, async_save=False) as checkpointer:
        checkpointer.save(max(ref.step, 0), {"params": params}, config=config, force=True)
    return workdir


__all__ = ["merge_into_checkpoint"]

"""Loading trained (or converted) models for inference stages: precompute, generate, evaluate.

Every trainer writes `WORKDIR/checkpoints/<step>/{state, config, data_iter}`; `state` holds
`params/<section>/...` and, when the trainer keeps one, `ema/<section>/...` (section = the config key of the model:
"autoencoder", "model", "conditioner"). The `config` item is the resolved training config, so a checkpoint says by
itself how to rebuild its models. `path` may be the workdir, its `checkpoints/` directory, or one step's directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from musicdiff.models import registry
from musicdiff.parallel.sharding import Rules, param_shardings
from musicdiff.training.checkpoint import CheckpointError, _step_directory, restore_params_only
from musicdiff.training.loop import CHECKPOINT_DIR


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    step_dir: Path
    step: int
    config: ml_collections.ConfigDict

    def has_subtree(self, name: str) -> bool:
        """Whether the checkpoint state stores arrays under `name/` (e.g. "ema/model")."""
        return any(key.startswith(name + "/") for key in stored_names(self.step_dir))

    def fingerprint(self) -> str:
        """Identifies these weights (precompute manifests): sha256 over the step, the arrays' names, shapes and
        dtypes, and the bytes of every file of the saved state. A copied checkpoint keeps it; another training run
        of the same size and step does not."""
        digest = hashlib.sha256(json.dumps({"step": self.step,
                                            "arrays": sorted(stored_names(self.step_dir).items())}).encode())
        for file in sorted(p for p in (self.step_dir / "state").rglob("*") if p.is_file()):
            digest.update(file.relative_to(self.step_dir).as_posix().encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:32]


def stored_names(step_dir: Path) -> dict[str, str]:
    """{array name: "shape dtype"} of a step's state, from its metadata (no array is read)."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(step_dir) / "state")
    finally:
        handler.close()
    tree = getattr(tree, "tree", tree)
    return {name: f"{tuple(meta.shape)} {meta.dtype}" for name, meta in dict(tree).items()}


def find_checkpoint(path: str | Path, step: int | None = None) -> CheckpointRef:
    """Resolves a workdir / checkpoints dir / step dir to one step and its config."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory; pass a training workdir or a checkpoint step "
                              f"directory")
    if (path / CHECKPOINT_DIR).is_dir() and not (path / "state").is_dir():
        path = path / CHECKPOINT_DIR
    step_dir = Path(str(_step_directory(epath.Path(path), step)))
    config_file = step_dir / "config" / "metadata"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {step_dir}: has no config item, so its models cannot be rebuilt; it was "
                              f"not written by a musicdiff trainer or launch.convert")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    return CheckpointRef(step_dir=step_dir, step=int(step_dir.name) if step_dir.name.isdigit() else -1,
                         config=config)


def load_model(ref: CheckpointRef, section: str, *, mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
               prefer_ema: bool = True, model_config: ml_collections.ConfigDict | None = None) -> nnx.Module:
    """The model of config section `section`, with EMA weights when the checkpoint has them (and `prefer_ema`).

    With a mesh the weights are read straight into their sharded layout (Orbax reads only each device's shards).
    """
    model_config = model_config if model_config is not None else ref.config[section]
    abstract = nnx.eval_shape(lambda: registry.build(model_config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    if mesh is not None:
        from musicdiff.config import DEFAULT_SHARDING_RULES

        shardings = param_shardings(abstract_params, rules or DEFAULT_SHARDING_RULES, mesh)
        abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_params, shardings)
    subtree = f"ema/{section}" if prefer_ema and ref.has_subtree(f"ema/{section}") else f"params/{section}"
    if not ref.has_subtree(subtree):
        raise CheckpointError(f"checkpoint {ref.step_dir}: holds no '{section}' model (no {subtree}/ arrays)")
    params = restore_params_only(ref.step_dir, abstract_params, subtree=subtree)
    return nnx.merge(graphdef, params)


def params_of(module: nnx.Module) -> Any:
    return nnx.state(module, nnx.Param)


__all__ = ["CheckpointRef", "find_checkpoint", "load_model", "params_of", "stored_names"]

"""The checkpoint layer below training and inference: where checkpoints live, how they are written and read.

Every trainer writes `WORKDIR/checkpoints/<step>/{state, data_iter, config}` (CHECKPOINT_DIR); `state` holds
`params/<section>/...` and, when the trainer keeps one, `ema/<section>/...` (section = the config key of the model:
"autoencoder", "model", "conditioner", ...). The `config` item is the resolved training config, so a checkpoint says by
itself how to rebuild its models (`find_checkpoint`, `load_model`).

The Orbax CheckpointManager (`Checkpointer`) has three items per step:

- `state`: the train state, any pytree of jax arrays (params, optimiser state, EMA, step, RNG key). It is stored as
  a flat dict keyed by readable paths ("params/encoder/layers/0/conv/kernel"), so checkpoints do not depend on the
  container types (nnx.State, dict, optax namedtuples) and params can be picked out for fine-tuning. The `.value`
  of nnx Variables is dropped from names, so a pure dict and an nnx.State give the same names. Typed PRNG keys are
  stored as their uint32 key data and re-wrapped on restore.
- `data_iter`: the Grain iterator state, through grain's Orbax handler (one JSON file per process:
  `process_{i}-of-{n}.json`).
- `config`: the resolved config as JSON.

Restores go *into* an abstract target (ShapeDtypeStructs carrying shardings), so a checkpoint written on one mesh
restores onto another; Orbax reads only the shards each device needs. Before reading, names, shapes and dtypes are
compared with the checkpoint's metadata and any difference raises `CheckpointError` listing them; errors from
Orbax are re-raised as `CheckpointError` with the step and directory, never swallowed.

Saves are asynchronous: `save` returns once the arrays are copied to host memory (the caller may donate or delete
the device buffers right away); files are written in a background thread. Atomicity is Orbax's: a step is written
to `<step>.orbax-checkpoint-tmp-<n>` and renamed to `<step>` when complete (on object stores, which cannot rename,
a commit marker file plays that role), so an interrupted save never looks like a checkpoint and `latest_step`
only sees finished ones. Call `wait_until_finished` before exiting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from musicdiff.models import registry
from musicdiff.parallel.sharding import DEFAULT_SHARDING_RULES, Rules, param_shardings

CHECKPOINT_DIR = "checkpoints"  # a workdir's checkpoints: WORKDIR/checkpoints/<step>/


def _single_process_array_writes() -> None:
    """Orbax's replica-parallel saving splits each replicated array between its replicas so that several hosts share
    the writing. In one process every replica is on this host, so the bytes written are the same, and the split only
    adds a compiled slice per array shape and device: the first save of 150 small replicated arrays on 8 CPU devices
    took 14.0 s with it and 0.34 s without. Multi-process runs keep Orbax's default."""
    if jax.process_count() == 1:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
_ITEMS = ("state", "data_iter", "config")
_MAX_LISTED = 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or restored as asked. The message names the step, directory and the fix."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    config: dict[str, Any] | None


def _key_name(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name  # nnx.Variable's payload: not part of the name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    """A pytree path as the name checkpoints store it under: parts joined with '/' ("model/transformer/...")."""
    return "/".join(part for part in map(_key_name, path) if part is not None) or "root"


def flatten_with_names(tree: Any) -> tuple[dict[str, Any], Any]:
    """({path name: leaf}, treedef). Names join path parts with '/'; two leaves with one name are refused."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for path, leaf in leaves_with_paths:
        name = path_name(path)
        if name in flat:
            raise CheckpointError(f"two leaves of the state share the checkpoint name '{name}'; rename one of them")
        flat[name] = leaf
    return flat, treedef


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def abstract_target(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for arrays (or structs) of `tree`, with `shardings` (a matching tree) when given."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _key_data_target(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    # The trailing key-data dimension is left unsharded: a NamedSharding's spec simply does not name it.
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def _describe(struct: Any) -> str:
    return f"{tuple(struct.shape)} {np.dtype(struct.dtype).name}"


def _compare(stored: Mapping[str, Any], wanted: Mapping[str, Any], check_dtype: bool) -> list[str]:
    problems = [f"  missing in checkpoint: {name} {_describe(wanted[name])}" for name in wanted if name not in stored]
    problems += [f"  not in target: {name} {_describe(stored[name])}" for name in stored if name not in wanted]
    for name in wanted:
        if name in stored:
            have, want = stored[name], wanted[name]
            if tuple(have.shape) != tuple(want.shape) or (check_dtype and np.dtype(have.dtype) != np.dtype(want.dtype)):
                problems.append(f"  {name}: checkpoint has {_describe(have)}, target wants {_describe(want)}")
    return problems


def _raise_if_incompatible(problems: list[str], where: str, fix: str) -> None:
    if problems:
        shown = problems[:_MAX_LISTED] + ([f"  ... and {len(problems) - _MAX_LISTED} more"]
                                         if len(problems) > _MAX_LISTED else [])
        raise CheckpointError(f"{where} does not match the target ({len(problems)} differences):\n"
                              + "\n".join(shown) + f"\n{fix}")


def _stored_arrays(tree_metadata: Any) -> dict[str, Any]:
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return dict(tree)


def _flat_target(abstract_state: Any) -> tuple[dict[str, jax.ShapeDtypeStruct], Any, dict[str, Any]]:
    flat, treedef = flatten_with_names(abstract_state)
    keys = {name: leaf for name, leaf in flat.items() if _is_key(leaf)}
    target = {}
    for name, leaf in flat.items():
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise CheckpointError(f"restore target leaf '{name}' is a {type(leaf).__name__}; use ShapeDtypeStructs")
        target[name] = _key_data_target(leaf) if name in keys else jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
    return target, treedef, keys


def _unflatten(restored: Mapping[str, Any], names: list[str], treedef: Any, keys: Mapping[str, Any]) -> Any:
    leaves = [jax.random.wrap_key_data(restored[n], dtype=keys[n].dtype) if n in keys else restored[n] for n in names]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _jsonable(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=lambda v: v.item() if hasattr(v, "item") else str(v)))


class Checkpointer:
    """Orbax CheckpointManager for a trainer's workdir: interval saves (and forced ones), keep-N, sharded restore."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, save_interval_steps: int = 1000,
                 keep_period: int | None = None, async_save: bool = True):
        """`keep_period`: also keep every step that is a multiple of it (milestones survive keep-N)."""
        _single_process_array_writes()
        self.directory = epath.Path(directory)
        policies = ocp.checkpoint_managers
        preservation = policies.LatestN(max_to_keep)
        if keep_period:
            preservation = policies.AnyPreservationPolicy([preservation, policies.EveryNSteps(keep_period)])
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            # Preemption is the training loop's (a SIGTERM flag agreed across processes, then a forced save).
            save_decision_policy=policies.FixedIntervalPolicy(save_interval_steps),
            preservation_policy=preservation,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers=dict(state=ocp.StandardCheckpointHandler(), data_iter=grain.checkpoint.CheckpointHandler(),
                               config=ocp.JsonCheckpointHandler()),
        )

    # ---- saving ---------------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, data_iter: Any = None, config: Any = None, force: bool = False) -> bool:
        """Saves if the policy says so (or `force`); returns whether a save started. A saved step is not rewritten."""
        if not force and not self._manager.should_save(step):
            return False
        if step in self.all_steps():
            return False
        flat, _ = flatten_with_names(state)
        flat = {name: jax.random.key_data(leaf) if _is_key(leaf) else leaf for name, leaf in flat.items()}
        items = dict(state=ocp.args.StandardSave(flat))
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_jsonable(config))
        try:
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as err:
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {err}") from err

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are on disk; raises if one failed."""
        self._manager.wait_until_finished()

    # ---- restoring ------------------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, *, step: int | None = None, data_iter: Any = None) -> Restored:
        """Restores `step` (default: the latest) into `abstract_state` (ShapeDtypeStructs with shardings).

        `data_iter`, when given, is set to the saved position in place. Any mismatch raises `CheckpointError`.
        """
        self._manager.wait_until_finished()  # a step still being written is not restorable yet
        self._manager.reload()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint in {self.directory} to restore")
            step = steps[-1]
        if step not in steps:
            raise CheckpointError(f"step {step} is not in {self.directory}; saved steps: {steps or 'none'}")
        step_dir = self.directory / str(step)
        target, treedef, keys = _flat_target(abstract_state)
        stored = _stored_arrays(self._manager.item_metadata(step)["state"])
        _raise_if_incompatible(
            _compare(stored, target, check_dtype=True), f"checkpoint {step_dir}",
            "Resume needs the same model and optimiser; to start from these weights with a fresh optimiser, use "
            "--config.init_from (restore_params_only).",
        )
        items = dict(state=ocp.args.StandardRestore(target))
        if (step_dir / "config").exists():
            items["config"] = ocp.args.JsonRestore()
        if data_iter is not None:
            if not (step_dir / "data_iter").exists():
                raise CheckpointError(f"checkpoint {step_dir} has no data iterator state; it was saved without "
                                      f"data_iter, so the data position cannot be restored")
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:
            raise CheckpointError(f"restoring step {step} from {self.directory} failed: {err}") from err
        state = _unflatten(restored["state"], list(target), treedef, keys)
        return Restored(step=step, state=state, config=restored["config"] if "config" in items else None)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def step_directory(path: epath.Path, step: int | None) -> epath.Path:
    if (path / "state").is_dir():
        if step is not None:
            raise CheckpointError(f"{path} is already one step's checkpoint; pass its parent directory with a step")
        return path
    if not path.is_dir():
        raise CheckpointError(f"init_from={path}: no such checkpoint directory")
    steps = sorted(ocp.step.checkpoint_steps(path))  # finalized steps only; temporary directories are skipped
    if not steps:
        raise CheckpointError(f"init_from={path}: holds no checkpoint steps (nor a 'state' item)")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"init_from={path}: step {step} not saved; saved steps: {steps}")
    return path / str(step)


def restore_params_only(path: str | Path, abstract_params: Any, *, subtree: str = "params",
                        step: int | None = None, fresh: Any = None,
                        missing_ok: Callable[[str], bool] | None = None) -> Any:
    """Reads one subtree of a checkpoint's `state` (default "params") into `abstract_params`, for fine-tuning.

    `path` is a checkpoint directory (its latest step, or `step`) or one step's directory. Names and shapes must
    match (else `CheckpointError` listing the differences); dtypes are cast to the target's, so fp32 weights can
    initialise a bf16 model. The optimiser state, step and data position are not read.
    With `fresh` (concrete arrays shaped like the target) and `missing_ok(name)`, arrays the checkpoint lacks whose
    names (relative to the subtree) `missing_ok` accepts are taken from `fresh`: new adapter weights on a base model.
    """
    step_dir = step_directory(epath.Path(path), step)
    inner, treedef, keys = _flat_target(abstract_params)
    target = {f"{subtree}/{name}": struct for name, struct in inner.items()}
    handler = ocp.PyTreeCheckpointHandler()  # the format StandardCheckpointHandler writes; allows partial reads
    try:
        stored = {name: meta for name, meta in _stored_arrays(handler.metadata(step_dir / "state")).items()
                  if name.startswith(f"{subtree}/")}
        if not stored:
            raise CheckpointError(f"init_from={step_dir}: the checkpoint state has no '{subtree}/' subtree")
        kept_fresh = set()
        if fresh is not None and missing_ok is not None:
            kept_fresh = {name for name in inner if f"{subtree}/{name}" not in stored and missing_ok(name)}
            target = {name: struct for name, struct in target.items() if name[len(subtree) + 1:] not in kept_fresh}
        _raise_if_incompatible(_compare(stored, target, check_dtype=False), f"init_from={step_dir} ({subtree})",
                               "The checkpoint was written for another model configuration.")
        try:
            restored = handler.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        except Exception as err:
            raise CheckpointError(f"init_from={step_dir}: reading '{subtree}' failed: {err}") from err
    finally:
        handler.close()
    values = {name[len(subtree) + 1:]: value for name, value in restored.items()}
    if kept_fresh:
        fresh_flat, _ = flatten_with_names(fresh)
        values.update({name: fresh_flat[name] for name in kept_fresh})
    return _unflatten(values, list(inner), treedef, keys)


# ------------------------------------------------------------------------------------------ finding and loading


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
    step_dir = Path(str(step_directory(epath.Path(path), step)))
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
        shardings = param_shardings(abstract_params, rules or DEFAULT_SHARDING_RULES, mesh)
        abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_params, shardings)
    subtree = f"ema/{section}" if prefer_ema and ref.has_subtree(f"ema/{section}") else f"params/{section}"
    if not ref.has_subtree(subtree):
        raise CheckpointError(f"checkpoint {ref.step_dir}: holds no '{section}' model (no {subtree}/ arrays)")
    params = restore_params_only(ref.step_dir, abstract_params, subtree=subtree)
    return nnx.merge(graphdef, params)


__all__ = ["CHECKPOINT_DIR", "CheckpointError", "CheckpointRef", "Checkpointer", "Restored", "abstract_target",
           "find_checkpoint", "flatten_with_names", "load_model", "path_name", "restore_params_only", "step_directory",
           "stored_names"]

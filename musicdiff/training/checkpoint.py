"""Checkpoints for every trainer: an Orbax CheckpointManager with three items per step.

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
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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


def flatten_with_names(tree: Any) -> tuple[dict[str, Any], Any]:
    """({path name: leaf}, treedef). Names join path parts with '/'; two leaves with one name are refused."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for path, leaf in leaves_with_paths:
        name = "/".join(part for part in map(_key_name, path) if part is not None) or "root"
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
    """Orbax CheckpointManager for a trainer's workdir: interval + preemption saves, keep-N, sharded restore."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, save_interval_steps: int = 1000,
                 keep_period: int | None = None, async_save: bool = True):
        """`keep_period`: also keep every step that is a multiple of it (milestones survive keep-N)."""
        self.directory = epath.Path(directory)
        policies = ocp.checkpoint_managers
        preservation = policies.LatestN(max_to_keep)
        if keep_period:
            preservation = policies.AnyPreservationPolicy([preservation, policies.EveryNSteps(keep_period)])
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_interval_steps), policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=preservation,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers=dict(state=ocp.StandardCheckpointHandler(), data_iter=grain.checkpoint.CheckpointHandler(),
                               config=ocp.JsonCheckpointHandler()),
        )

    # ---- saving ---------------------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (save interval or preemption)."""
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption notice reached all processes: save with force=True, wait, then exit cleanly."""
        return self._manager.reached_preemption(step)

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


def _step_directory(path: epath.Path, step: int | None) -> epath.Path:
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
                        step: int | None = None) -> Any:
    """Reads one subtree of a checkpoint's `state` (default "params") into `abstract_params`, for fine-tuning.

    `path` is a checkpoint directory (its latest step, or `step`) or one step's directory. Names and shapes must
    match (else `CheckpointError` listing the differences); dtypes are cast to the target's, so fp32 weights can
    initialise a bf16 model. The optimiser state, step and data position are not read.
    """
    step_dir = _step_directory(epath.Path(path), step)
    inner, treedef, keys = _flat_target(abstract_params)
    target = {f"{subtree}/{name}": struct for name, struct in inner.items()}
    handler = ocp.PyTreeCheckpointHandler()  # the format StandardCheckpointHandler writes; allows partial reads
    try:
        stored = {name: meta for name, meta in _stored_arrays(handler.metadata(step_dir / "state")).items()
                  if name.startswith(f"{subtree}/")}
        if not stored:
            raise CheckpointError(f"init_from={step_dir}: the checkpoint state has no '{subtree}/' subtree")
        _raise_if_incompatible(_compare(stored, target, check_dtype=False), f"init_from={step_dir} ({subtree})",
                               "The checkpoint was written for another model configuration.")
        try:
            restored = handler.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        except Exception as err:
            raise CheckpointError(f"init_from={step_dir}: reading '{subtree}' failed: {err}") from err
    finally:
        handler.close()
    return _unflatten({name[len(subtree) + 1:]: value for name, value in restored.items()}, list(inner), treedef,
                      keys)


__all__ = ["CheckpointError", "Checkpointer", "Restored", "abstract_target", "flatten_with_names",
           "restore_params_only"]

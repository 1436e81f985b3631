"""Logical-axis sharding: model code names logical axes, config rules map them onto mesh axes.

Rules are a sequence of `(logical_name, mesh_axes)` pairs where mesh_axes is None (replicated), one mesh axis name,
or a tuple of them. A mesh axis is used at most once per array; axes of size 1 are dropped, and a dimension that its
mesh axes do not divide falls back to fewer axes (and finally to replication) rather than failing at compile time.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from musicdiff.errors import ConfigError, ShardingContextError

# Parameters carry their logical names as metadata; placement happens explicitly from the rules, never eagerly.
nnx.use_eager_sharding(False)

Rules = Sequence[tuple[str, Any]]

# Model code names logical axes; these rules place them on the mesh (data, fsdp, tensor, sequence).
DEFAULT_SHARDING_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("cond_embed", None),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("kernel", None),
    ("norm", None),
    ("layers", None),
    ("codebook", None),
)


def rules_from_config(config: Any) -> tuple[tuple[str, Any], ...]:
    """`config.sharding_rules` (the defaults when the config has none) as a tuple of pairs, hashable also when the
    config came from JSON (lists of mesh axes become tuples)."""
    return tuple(tuple(tuple(part) if isinstance(part, list) else part for part in rule)
                 for rule in config.get("sharding_rules", DEFAULT_SHARDING_RULES))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | str | None] = contextvars.ContextVar("musicdiff_sharding", default=None)


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        if len(entry) != 2:
            raise ConfigError(f"config.sharding_rules: entry {entry!r} must be a (logical_name, mesh_axes) pair")
        name, axes = entry
        if name in table:
            continue  # first rule wins, as in flax's logical_to_mesh_axes
        if axes is None:
            table[name] = ()
        elif isinstance(axes, str):
            table[name] = (axes,)
        else:
            table[name] = tuple(axes)
    return table


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None] | None, shape: Sequence[int], rules: Rules, mesh: Mesh
) -> P:
    """Maps one array's logical axis names to a mesh PartitionSpec, honouring divisibility and axis reuse."""
    if logical_axes is None:
        return P()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match array shape {tuple(shape)}")
    table = _rule_table(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ConfigError(
                f"config.sharding_rules: logical axis '{name}' has no rule; add ('{name}', None) to replicate it "
                f"or map it to mesh axes"
            )
        axes = [a for a in table[name] if a not in used and mesh.shape.get(a, 1) > 1]
        unknown = [a for a in table[name] if a not in mesh.shape]
        if unknown:
            raise ConfigError(f"config.sharding_rules: '{name}' maps to unknown mesh axis '{unknown[0]}'")
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def logical_specs(state: Any) -> Any:
    """The logical PartitionSpec of every variable of an nnx State (P() where a variable has none)."""
    return nnx.get_partition_spec(state)


def tree_logical_to_mesh(abstract_tree: Any, logical_tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """Maps a tree of arrays (or ShapeDtypeStructs) and its logical specs to a tree of NamedShardings."""

    def one(leaf, logical):
        if isinstance(leaf, optax.MaskedNode):
            return leaf  # optimiser state a frozen parameter does not have (training/optim.Freezing)
        logical = tuple(logical) if logical is not None and len(logical) else None
        if logical is not None and len(logical) < len(leaf.shape):
            logical = logical + (None,) * (len(leaf.shape) - len(logical))
        return NamedSharding(mesh, logical_to_mesh_spec(logical, leaf.shape, rules, mesh))

    return jax.tree.map(one, abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))


def param_shardings(abstract_state: Any, rules: Rules, mesh: Mesh) -> Any:
    """NamedShardings for an (abstract) nnx State, from the logical names its variables carry."""
    return tree_logical_to_mesh(abstract_state, logical_specs(abstract_state), rules, mesh)


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes that the largest-loaded device holds for a tree under the given shardings."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard_shape = sharding.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a batch array: the leading dimension follows the 'batch' rule, the rest is replicated."""
    axes = [a for a in _rule_table(rules).get("batch", ()) if mesh.shape.get(a, 1) > 1]
    lead = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
    return NamedSharding(mesh, P(lead) if lead is not None else P())


def batch_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split: the product of the mesh axes the 'batch' rule names."""
    return math.prod(mesh.shape.get(a, 1) for a in _rule_table(rules).get("batch", ()))


def process_batch_rows(mesh: Mesh, rules: Rules, global_batch_size: int) -> tuple[int, ...]:
    """The rows of every global batch that this process's devices hold, in increasing order: what its data
    pipeline must read (and `shard_batch` expects) so that P processes together form the batch one process would.

    With the mesh laid out process by process these are one contiguous block per process; with other layouts
    (TPU topologies, batch axes that do not span the processes) they may be several blocks, or the same rows on
    several processes (replicas)."""
    sharding = batch_sharding(mesh, rules)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((int(global_batch_size),)).values():
        rows.update(range(*index[0].indices(int(global_batch_size))))
    return tuple(sorted(rows))


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh, rules: Rules,
                global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Assembles global arrays from each process's rows of the batch (leading dimension; `process_batch_rows`).

    `global_batch_size` is needed when processes hold replicas of the same rows; without it the global size is
    inferred assuming every process holds distinct rows."""
    sharding = batch_sharding(mesh, rules)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        shape = None if global_batch_size is None else (int(global_batch_size),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


# A step's layout is chosen where it is traced: inside `sharding_context` (constraints from the mesh and rules) or
# inside `unsharded()` (a deliberate single-program run: no constraints). Model code traced under neither raises, so
# a step lowered outside its context fails at trace time instead of silently compiling without its constraints.
_UNSHARDED = "unsharded"


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `constrain` active: inside it, activations are pinned to the mesh by their logical names."""
    token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def unsharded() -> Iterator[None]:
    """Declares that the model code traced inside runs without sharding constraints (one device, or a program whose
    inputs' shardings alone decide the layout): what sampling, evaluation and tests of a bare module use."""
    token = _ACTIVE.set(_UNSHARDED)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_layout() -> tuple[Mesh, tuple[tuple[str, Any], ...]] | None:
    """The documented accessor for the mesh and rules of the step being traced: (mesh, rules) inside
    `sharding_context`, None inside `unsharded()`, and a ShardingContextError outside both."""
    active = _ACTIVE.get()
    if active is None:
        raise ShardingContextError(
            "model code ran outside a sharding context: trace the step inside "
            "musicdiff.parallel.sharding_context(mesh, rules) (training, precompute) or unsharded() (one-device "
            "sampling, evaluation, tests); without one its sharding constraints would be silently dropped")
    return None if active == _UNSHARDED else active


def split_count(logical_axis: str | None) -> int:
    """How many ways the current layout splits a dimension named `logical_axis` (1 when unsharded, for None, and for
    names mapped to no mesh axis or to axes of size 1). An upper bound: divisibility is not checked."""
    layout = current_layout()
    if layout is None or logical_axis is None:
        return 1
    mesh, rules = layout
    axes = _rule_table(rules).get(logical_axis, ())
    return math.prod(mesh.shape.get(axis, 1) for axis in axes)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names (none when unsharded; an error outside any layout)."""
    layout = current_layout()
    if layout is None:
        return x
    mesh, rules = layout
    spec = logical_to_mesh_spec(tuple(logical_axes), x.shape, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

"""Device mesh and logical-axis sharding: the single source of truth for how arrays are laid out (over all
processes of a multi-host job: distributed.py joins them)."""

from musicdiff.parallel.mesh import MESH_AXES, make_mesh, mesh_and_rules, mesh_config, mesh_shape_from_config
from musicdiff.parallel.sharding import (
    DEFAULT_SHARDING_RULES,
    Rules,
    batch_sharding,
    logical_specs,
    logical_to_mesh_spec,
    param_shardings,
    per_device_bytes,
    process_batch_rows,
    shard_batch,
    tree_logical_to_mesh,
    rules_from_config,
    sharding_context,
    constrain,
    current_layout,
    unsharded,
)

__all__ = [
    "DEFAULT_SHARDING_RULES",
    "Rules",
    "mesh_and_rules",
    "mesh_config",
    "MESH_AXES",
    "make_mesh",
    "mesh_shape_from_config",
    "batch_sharding",
    "logical_specs",
    "logical_to_mesh_spec",
    "param_shardings",
    "per_device_bytes",
    "process_batch_rows",
    "shard_batch",
    "tree_logical_to_mesh",
    "rules_from_config",
    "sharding_context",
    "current_layout",
    "unsharded",
    "constrain",
]

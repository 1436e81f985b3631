"""One device mesh with the named axes (data, fsdp, tensor, sequence), built from `config.mesh`.

`config.mesh.<axis>` is the axis's total size (one may be -1: the rest of the devices). `config.mesh.dcn_shape.<axis>`
says how many ways that axis spans the granules joined by the slow data-centre network (DCN): TPU slices of a
multi-slice job, or hosts of a GPU cluster. All 1 (the default) builds the mesh over the fast interconnect (ICI) as
`jax.make_mesh` lays it out. Otherwise the mesh comes from `mesh_utils.create_hybrid_device_mesh` with ICI shape
total / dcn per axis, so e.g. `dcn_shape.data=2` puts the data-parallel gradient all-reduce, and only it, across
two slices while fsdp/tensor collectives stay inside each slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh

from musicdiff.errors import ConfigError
from musicdiff.parallel.distributed import log_topology
from musicdiff.parallel.sharding import Rules, rules_from_config

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")
DCN_KEY = "dcn_shape"


def mesh_shape_from_config(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves the configured axis sizes (one may be -1, meaning "the rest") against a device count."""
    unknown = sorted(set(mesh_config) - set(MESH_AXES) - {DCN_KEY})
    if unknown:
        raise ConfigError(
            f"config.mesh.{unknown[0]}: unknown mesh axis; the mesh axes are {', '.join(MESH_AXES)}"
        )
    sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(
            f"config.mesh: axes {', '.join(fill)} are all -1; at most one axis may be -1 (the rest of the devices)"
        )
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"config.mesh.{axis}={size}: axis sizes must be positive, or -1 for the rest")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh: the fixed axes multiply to {fixed}, which does not divide the {num_devices} devices; "
                f"make their product a divisor of {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ConfigError(
            f"config.mesh: {shape} has {fixed} devices but {num_devices} are available; "
            f"set one axis to -1 (e.g. --config.mesh.data=-1) or make the product {num_devices}"
        )
    return sizes


def dcn_shape_from_config(mesh_config: Mapping[str, int], sizes: Mapping[str, int]) -> dict[str, int]:
    """The per-axis DCN factors of `config.mesh.dcn_shape` (all 1 when absent), checked against the axis sizes."""
    section = mesh_config.get(DCN_KEY, None) or {}
    unknown = sorted(set(section) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"config.mesh.dcn_shape.{unknown[0]}: unknown mesh axis; the mesh axes are "
                          f"{', '.join(MESH_AXES)}")
    dcn = {axis: int(section.get(axis, 1)) for axis in MESH_AXES}
    for axis, factor in dcn.items():
        if factor < 1 or sizes[axis] % factor:
            raise ConfigError(f"config.mesh.dcn_shape.{axis}={factor}: must be a positive divisor of the axis size "
                              f"config.mesh.{axis}={sizes[axis]} (the axis spans dcn_shape slices of "
                              f"size/dcn_shape devices each)")
    return dcn


def _granules(devices: Sequence[jax.Device]) -> tuple[bool, int]:
    """(granules are processes, granule count): TPU slices when the devices carry several slice indices, else hosts
    (GPU clusters; CPU devices report slice 0 everywhere)."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        return False, len(slices)
    return True, len({d.process_index for d in devices})


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh over `devices` (default: all devices of all processes) with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape_from_config(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn = dcn_shape_from_config(mesh_config, sizes)
    if math.prod(dcn.values()) == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    by_process, granules = _granules(devices)
    if granules != math.prod(dcn.values()):
        kind = "processes (hosts)" if by_process else "TPU slices"
        raise ConfigError(f"config.mesh.dcn_shape: {' x '.join(f'{a}={dcn[a]}' for a in MESH_AXES)} spans "
                          f"{math.prod(dcn.values())} granules but the devices belong to {granules} {kind}; make "
                          f"the dcn_shape product {granules}, or all 1 for a mesh without the DCN split")
    ici = tuple(sizes[axis] // dcn[axis] for axis in MESH_AXES)
    grid = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[axis] for axis in MESH_AXES), devices,
                                                process_is_granule=by_process)
    return Mesh(np.asarray(grid), MESH_AXES, axis_types=axis_types)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, *,
                dcn_shape: dict[str, int] | None = None) -> ml_collections.ConfigDict:
    """The mesh section: total axis sizes (one may be -1) and `dcn_shape`, how many ways each axis spans slices
    (multi-slice TPU) or hosts (GPU clusters) over the slower data-centre network; all 1 = one slice."""
    dcn = {**dict(data=1, fsdp=1, tensor=1, sequence=1), **(dcn_shape or {})}
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence, dcn_shape=dcn))


def mesh_and_rules(config: Any, devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Rules]:
    """The mesh of `config.mesh` over all processes' devices (default) and the config's sharding rules; logs the
    topology once."""
    mesh = make_mesh(config.mesh, devices)
    log_topology(mesh)
    return mesh, rules_from_config(config)

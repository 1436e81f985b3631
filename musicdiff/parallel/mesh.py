"""One device mesh with the named axes (data, fsdp, tensor, sequence), built from `config.mesh`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from musicdiff.errors import ConfigError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")


def mesh_shape_from_config(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves the configured axis sizes (one may be -1, meaning "the rest") against a device count."""
    unknown = sorted(set(mesh_config) - set(MESH_AXES))
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


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh over `devices` (default: all devices of all processes) with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape_from_config(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )

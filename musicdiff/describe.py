"""Parameter counts and per-device memory of a config's models, computed abstractly (no memory spent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from musicdiff.parallel import DEFAULT_SHARDING_RULES
from musicdiff.files import atomic_write_json
from musicdiff.models import registry
from musicdiff.parallel import make_mesh, param_shardings, per_device_bytes


def abstract_params(model_config: ml_collections.ConfigDict) -> nnx.State:
    """The parameter State of a model as ShapeDtypeStructs (built under eval_shape)."""
    model = nnx.eval_shape(lambda: registry.build(model_config, nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def count(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def describe_config(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> dict[str, Any]:
    mesh = make_mesh(config.mesh, devices)
    rules = config.get("sharding_rules", DEFAULT_SHARDING_RULES)
    report: dict[str, Any] = {"mesh": dict(mesh.shape), "models": {}}
    total_params, total_bytes = 0, 0
    for section, model_config in registry.models_in(config).items():
        params = abstract_params(model_config)
        shardings = param_shardings(params, rules, mesh)
        modules = {str(name): count(sub) for name, sub in params.items()}
        n_params, n_bytes = count(params), per_device_bytes(params, shardings)
        report["models"][section] = {
            "name": model_config.name,
            "param_count": n_params,
            "per_device_param_bytes": n_bytes,
            "modules": modules,
        }
        total_params += n_params
        total_bytes += n_bytes
    report["param_count"] = total_params
    report["per_device_param_bytes"] = total_bytes
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = ["mesh: " + " x ".join(f"{axis}={size}" for axis, size in report["mesh"].items())]
    for section, model in report["models"].items():
        lines.append(f"\n[{section}] {model['name']}")
        for name, n in model["modules"].items():
            lines.append(f"  {name:<40s} {n:>16,d}")
        lines.append(f"  {'total':<40s} {model['param_count']:>16,d}")
        lines.append(f"  {'per-device bytes':<40s} {model['per_device_param_bytes']:>16,d}")
    lines.append(f"\nall models: {report['param_count']:,d} parameters, "
                 f"{report['per_device_param_bytes']:,d} bytes per device")
    return "\n".join(lines)


def describe_stage(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """launch.describe: prints the report and writes WORKDIR/describe.json."""
    report = describe_config(config)
    print(format_report(report))
    atomic_write_json(Path(workdir) / "describe.json", report)
    return report

"""Config files, command-line overrides and validation.

Config files are Python (`configs/<name>.py` with `get_config(arg)`), as in big_vision. Overrides come as
`--config.a.b=value` and are typed after the value they replace. Unknown keys and contradictions fail before anything
is compiled, with one line that names the key and the fix.

Config files compose from shared pieces, each defined once: `choose_preset` picks a file's preset, `stage_config`
starts a stage's config with the keys every model-running stage shares (seed, global batch, mesh, sharding rules,
multi-host start-up), and sections come from the module that reads them (e.g. data_pipelines.audio_folder's
`audio_folder_data`), assigned as `config.<section> = ...`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ml_collections

from musicdiff.errors import ConfigError
from musicdiff.parallel.distributed import distributed_config
from musicdiff.parallel.mesh import mesh_config
from musicdiff.parallel.sharding import DEFAULT_SHARDING_RULES

Preset = TypeVar("Preset")


def choose_preset(arg: str | None, presets: Mapping[str, Preset]) -> Preset:
    """The preset `arg` names (None and "" are the same); a ValueError that lists the choices otherwise.

    A file without presets passes `{"": ...}`: its only choice is no argument.
    """
    name = arg or ""
    if name in presets:
        return presets[name]
    if list(presets) == [""]:
        raise ValueError(f"takes no preset, got '{name}'")
    raise ValueError(f"unknown preset '{name}'; choose one of {', '.join(p or '(none)' for p in presets)}")


def stage_config(batch_size: int | None = None, *, distributed: bool = False) -> ml_collections.ConfigDict:
    """The keys every stage that runs a model starts from: `seed`, the global `batch_size` (when the stage has one),
    `mesh` and `sharding_rules` (musicdiff/parallel), and `distributed` for stages that run on several hosts
    (musicdiff/parallel/distributed.py, launch/README.md)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    if batch_size is not None:
        config.batch_size = batch_size
    config.mesh = mesh_config()
    config.sharding_rules = DEFAULT_SHARDING_RULES
    if distributed:
        config.distributed = distributed_config()
    return config

def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` and applies `a.b=value` overrides; returns a locked ConfigDict."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config={spec}: no such config file {path}; pass e.g. --config=configs/diffusion.py:tiny")
    module_spec = importlib.util.spec_from_file_location(f"musicdiff_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={spec}: {path} defines no get_config(arg) function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except (KeyError, ValueError) as err:
        raise ConfigError(f"--config={spec}: {err}") from None
    for override in overrides:
        key, eq, value = override.partition("=")
        if not eq:
            raise ConfigError(f"--config.{key}: an override needs a value, as --config.{key}=VALUE")
        set_value(config, key, value)
    config.lock()
    return config


def set_value(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
    """Sets config[a][b] from its command-line text, typed after the current value. Unknown keys are refused."""
    parts = dotted_key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(parts[:depth])
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"did you mean config.{prefix + '.' if prefix else ''}{close[0]}?" if close else (
                f"valid keys here: {', '.join(sorted(keys))}" if keys else "this value has no sub-keys")
            raise ConfigError(f"config.{dotted_key}: unknown key '{part}'; {hint}")
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    with node.unlocked():
        node[leaf] = _parse_like(node[leaf], text, dotted_key)


def _parse_like(current: Any, text: str, key: str) -> Any:
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key}: is a group of keys; override its members as --config.{key}.NAME=VALUE")
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return type(current)(value)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"config.{key}={text!r}: expected a {type(current).__name__} like the default {current!r}"
        ) from None
    # None (or another type) as default: a Python literal if it parses, else the text itself.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def downsampling_ratio(model_config: ml_collections.ConfigDict) -> int:
    """Samples per latent frame of an autoencoder config: its patch size (SAME; 1 without) times its strides
    (1 when the config has no strides)."""
    strides = model_config.get("strides", None)
    return int(model_config.get("patch_size", 1)) * (int(math.prod(strides)) if strides else 1)


def validate(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    """Checks what would otherwise fail late (or silently) once devices and data are involved.

    `num_devices=None` skips the checks that need the device count (stages that run no model).
    """
    from musicdiff.parallel.mesh import mesh_shape_from_config

    mesh = mesh_shape_from_config(config.mesh, num_devices) if "mesh" in config and num_devices else {}
    batch_size = config.get("batch_size", None)
    if batch_size is not None:
        if batch_size <= 0:
            raise ConfigError(f"config.batch_size={batch_size}: must be positive")
        rules = dict((name, axes) for name, axes in config.get("sharding_rules", DEFAULT_SHARDING_RULES))
        batch_axes = rules.get("batch") or ()
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        parallel = math.prod(mesh.get(axis, 1) for axis in batch_axes)
        if batch_size % parallel:
            raise ConfigError(
                f"config.batch_size={batch_size}: the global batch must be divisible by the data-parallel size "
                f"{parallel} ({' x '.join(f'{a}={mesh.get(a, 1)}' for a in batch_axes)}); "
                f"use a multiple of {parallel}, e.g. --config.batch_size={parallel * max(1, batch_size // parallel)}"
            )
    data = config.get("data", None)
    if data is not None and "sample_rate" in data and data.sample_rate <= 0:
        raise ConfigError(f"config.data.sample_rate={data.sample_rate}: must be a positive number of Hz")
    model = config.get("autoencoder", None) or config.get("model", None)
    if data is not None and model is not None and "sample_size" in data:
        ratio = downsampling_ratio(model)
        if data.sample_size % ratio:
            fixed = (data.sample_size // ratio + 1) * ratio
            raise ConfigError(
                f"config.data.sample_size={data.sample_size}: must be a multiple of the model's downsampling ratio "
                f"{ratio}; use --config.data.sample_size={fixed}"
            )
        model_rate = model.get("sample_rate", None)
        if model_rate is not None and "sample_rate" in data and data.sample_rate != model_rate:
            raise ConfigError(
                f"config.data.sample_rate={data.sample_rate}: the model runs at {model_rate} Hz; audio is resampled "
                f"to the model rate, so set --config.data.sample_rate={model_rate}"
            )

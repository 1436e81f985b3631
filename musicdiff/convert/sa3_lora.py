"""Stable Audio 3 LoRA files <-> musicdiff weight adapters (spec §8), both ways.

    config, weights = import_sa3_lora("style.safetensors", diffusion_config, base_params)   # -> save_adapter / load
    export_sa3_lora("style.safetensors", config, weights, diffusion_config, base_params)   # the reference loads it
    convert_sa3_lora_file(src, "OUT/adapter.safetensors", diffusion_config, base_params)   # launch.convert --lora
    export_sa3_lora_file("RUN/adapter.safetensors", dst, diffusion_config, base_params)    # launch.convert --to

`diffusion_config` is the converted SA3 diffusion run's config (sections `model` and `conditioner`); `base_params`
({"model": params, "conditioner": params}, as `diffusion_base` reads them from its directory, or a function returning
them) is needed for LoRA-XS only, whose files store the core M alone.

A reference file (the reference's `save_lora_safetensors`) holds, per adapted layer, tensors named
`<module>.parametrizations.weight.0.<tensor>`, with <module> relative to the DiTWrapper ("model.transformer.layers.3.
self_attn.to_qkv") or to the MultiConditioner ("conditioners.seconds_total.embedder.embedding.1"), as float16; its
metadata `lora_config` is JSON {rank, alpha, adapter_type, dropout, include, exclude}. Modules map to our layers
through the converter's tensor rules (convert/sa3_dit_keys.py): the rule of `<module>.weight` names our kernel, whose
adapter layer `find_targets` names. Every adaptable rule here is the plain W = kernel[in, out]ᵀ (the DiT's 1×1 convs
are such Linears: Conv1d's (out, in·k) flattening is (out, in) at k = 1); each used rule is probed to be one, so the
tensors map unchanged (A [r, in], B [out, r], m [out], M [r, r]), and a rule that is not is refused.

Kinds: "lora" <-> "lora"; "dora-rows" (and the legacy "dora", which the reference reads as rows unless its
magnitudes are 2-D (1, in): then "dora-cols") <-> "dora"; "lora-xs" <-> "lora_xs". The reference recomputes LoRA-XS
bases from the weights it adapts (float32 SVD, each U column's largest-|·| entry made positive), as `init_adapter`
does: import computes them from `base_params`, export checks the adapter's own against them. dora-cols, bora and
the -xs hybrids (dora-rows-xs, dora-cols-xs, bora-xs) have no musicdiff kind and are refused by name.

Exported files name their layers exactly in `include` (the reference adapts every Linear / Conv1d whose name contains
an include entry; each entry is checked to select its own layer only), so the reference adapts the layers the file
has tensors for and no other. Tensors are written as float16, as the reference writes them: a value beyond float16's
range is refused by key, and a NaN or inf is refused by key on import (`checked_cast`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from musicdiff.convert.sa3_dit_keys import plan
from musicdiff.errors import ConfigError, DataError
from musicdiff.files import atomic_write_bytes
from musicdiff.models import registry
from musicdiff.models.weight_adapters import (TENSORS, AdapterConfig, Target, expected_shapes, find_targets,
                                              init_adapter, layer_tensors, read_adapter, save_adapter)
from musicdiff.weight_files import checked_cast, read_safetensors

# Our section -> the prefix of its modules in reference LoRA keys (relative to what the reference loader loads
# them into: `model.model`, the DiTWrapper, and `model.conditioner`).
SECTION_PREFIXES = {"model": "model.", "conditioner": "conditioners."}
PARAMETRIZATION = ".parametrizations.weight.0."  # the reference saves every LoRA at index 0
METADATA_KEY = "lora_config"
OUR_KIND = {"lora": "lora", "dora-rows": "dora", "lora-xs": "lora_xs"}  # reference adapter_type -> our kind
REFERENCE_TYPE = {kind: adapter_type for adapter_type, kind in OUR_KIND.items()}
UNSUPPORTED_TYPES = ("dora-cols", "bora", "dora-rows-xs", "dora-cols-xs", "bora-xs")
OUR_TENSOR = {"lora_A": "lora_a", "lora_B": "lora_b", "magnitude": "magnitude", "M_xs": "xs_m"}
REFERENCE_TENSOR = {ours: reference for reference, ours in OUR_TENSOR.items()}
SAVED_TENSORS = ("lora_A", "lora_B", "M_xs", "magnitude", "magnitude_r", "magnitude_c")  # the reference's name_is_lora
# The base's {"model": params, "conditioner": params}, or a function returning them, called only for LoRA-XS.
BaseParams = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None
BASES_TOLERANCE = 1e-3  # max |Δ| between unit singular vectors computed from the same weights


class LayerMap:
    """Reference LoRA modules <-> our adapter layers of one diffusion config, with the tensor rules between them."""

    def __init__(self, diffusion_config: Any):
        modules = {section: nnx.eval_shape(lambda s=section: registry.build(diffusion_config[s], nnx.Rngs(0)))
                   for section in SECTION_PREFIXES}
        by_param = {target.param_name: target
                    for target in find_targets(modules, AdapterConfig(include=("*",))).values()}
        self.targets: dict[str, Target] = {}  # reference module -> our layer
        self.rules: dict[str, Any] = {}
        self.reference_modules: list[str] = []  # every module with a weight, adaptable here or not
        for section, prefix in SECTION_PREFIXES.items():
            for rule in plan(section, diffusion_config[section], prefix).rules:
                if rule.path is None or not rule.key.endswith(".weight"):
                    continue
                module = rule.key[: -len(".weight")]
                self.reference_modules.append(module)
                target = by_param.get("/".join([section, *map(str, rule.path)]))
                if target is not None:
                    self.targets[module], self.rules[module] = target, rule
        self.modules = {target.name: module for module, target in self.targets.items()}  # our layer -> module

    def checked_target(self, module: str, key: str, where: str) -> Target:
        """The layer a reference module adapts, its rule probed to be W = kernel[in, out]ᵀ."""
        if module not in self.targets:
            raise ConfigError(f"{where}: key {key} adapts {module}, which this diffusion model has no adaptable layer "
                              f"for (its layers look like {next(iter(self.targets))}); convert the LoRA with the "
                              f"diffusion model it was trained for")
        target, rule = self.targets[module], self.rules[module]
        probe = np.arange(np.prod(target.shape), dtype=np.int64).reshape(target.shape)
        reference = np.asarray(rule.to_reference(probe))
        plain = probe.reshape(target.in_features, target.out_features).T
        if reference.reshape(reference.shape[0], -1).shape != plain.shape or \
                not np.array_equal(reference.reshape(plain.shape), plain):
            raise ConfigError(f"{where}: key {key}: {rule.key} {rule.reference_shape} is not the transposed "
                              f"[in, out] matrix of {target.param_name} {target.shape} (another element order), so "
                              f"its LoRA tensors cannot be mapped by a reshape")
        return target


def _split_key(key: str, where: str) -> tuple[str, str]:
    """(module, tensor) of a reference LoRA key."""
    module, separator, tensor = key.rpartition(PARAMETRIZATION)
    if not separator or "." in tensor or tensor not in SAVED_TENSORS:
        raise ConfigError(f"{where}: key {key} is not a LoRA tensor of the form "
                          f"<module>{PARAMETRIZATION}<{'|'.join(SAVED_TENSORS)}> (what the reference's "
                          f"save_lora_safetensors writes)")
    return module, tensor


# ---------------------------------------------------------------------------------------------------------- import


def read_sa3_lora(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors as numpy, lora_config) of a reference LoRA file: `.safetensors`, or a `.ckpt` that
    `torch.load(weights_only=True)` reads ({"state_dict": {key: tensor}, "lora_config": {...}}); nothing is
    unpickled."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Stable Audio 3 LoRA file {path}: not found; pass the .safetensors (or .ckpt) file the "
                        f"reference's LoRA training wrote")
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, "Stable Audio 3 LoRA file")
        if METADATA_KEY not in metadata:
            return tensors, {}
        try:
            return tensors, json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as error:
            raise DataError(f"Stable Audio 3 LoRA file {path}: metadata {METADATA_KEY} is not JSON ({error})") \
                from None
    if path.suffix in (".ckpt", ".pt", ".pth"):
        return _read_torch_lora(path)
    raise DataError(f"Stable Audio 3 LoRA file {path}: unknown format; pass a .safetensors or .ckpt LoRA file")


def _read_torch_lora(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        import torch
    except ImportError:
        raise DataError(f"Stable Audio 3 LoRA file {path}: reading a .ckpt needs PyTorch (pip install torch); or "
                        f"convert it to .safetensors with the reference's convert_lora_ckpt_to_safetensors") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(f"Stable Audio 3 LoRA file {path}: cannot be read with torch.load(weights_only=True) "
                        f"({type(error).__name__}: {error}); it holds more than tensors and plain values and is not "
                        f"unpickled here: convert it with the reference's convert_lora_ckpt_to_safetensors where you "
                        f"trust it, and pass the .safetensors file") from None
    state = loaded.get("state_dict") if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(value) for value in state.values()):
        raise DataError(f"Stable Audio 3 LoRA file {path}: holds no state dict of tensors (expected "
                        f"{{'state_dict': {{key: tensor}}, 'lora_config': {{...}}}})")
    lora_config = loaded.get("lora_config") or {}
    # float16 and bfloat16 values are float32 values: the cast is exact, and NaN / inf stay for checked_cast.
    return {key: value.detach().float().numpy() for key, value in state.items()}, dict(lora_config)


def _our_kind(lora_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], where: str) -> str:
    adapter_type = str(lora_config.get("adapter_type", "lora"))
    if adapter_type == "dora":  # the reference's resolve_adapter_type: the first magnitude's shape decides
        magnitude = next((value for key, value in tensors.items() if key.endswith(".magnitude")), None)
        legacy_cols = magnitude is not None and magnitude.ndim == 2 and magnitude.shape[0] == 1
        adapter_type = "dora-cols" if legacy_cols else "dora-rows"
    if adapter_type not in OUR_KIND:
        problem = "has no musicdiff adapter kind" if adapter_type in UNSUPPORTED_TYPES else \
            "is no adapter type of the reference"
        raise ConfigError(f"{where}: lora_config adapter_type={adapter_type!r} {problem}; supported: "
                          f"{', '.join(OUR_KIND)} (and the legacy 'dora' with per-output magnitudes); not supported: "
                          f"{', '.join(UNSUPPORTED_TYPES)}")
    return OUR_KIND[adapter_type]


def _rank(lora_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], where: str) -> int:
    """The config's rank, else the first tensor's (the reference's infer_global_rank)."""
    if lora_config.get("rank") is not None:
        return int(lora_config["rank"])
    for key, value in tensors.items():
        if key.endswith((".lora_A", ".M_xs")):
            return int(value.shape[0])
        if key.endswith(".lora_B"):
            return int(value.shape[1])
    raise ConfigError(f"{where}: has no lora_config rank and no lora_A / lora_B / M_xs tensor to infer it from")


def import_sa3_lora(path: str | Path, diffusion_config: Any,
                    base_params: BaseParams = None) -> tuple[AdapterConfig, dict[str, Any]]:
    """(AdapterConfig, nested float32 weights) of a reference LoRA file, for `save_adapter` / `apply_adapters` on
    the converted model of `diffusion_config`. The config's include names the adapted layers exactly."""
    where = f"Stable Audio 3 LoRA file {path}"
    tensors, lora_config = read_sa3_lora(path)
    if not tensors:
        raise DataError(f"{where}: holds no tensors")
    kind = _our_kind(lora_config, tensors, where)
    rank = _rank(lora_config, tensors, where)
    alpha = float(lora_config.get("alpha", rank))
    if alpha == 0:  # our alpha 0 means "alpha = rank"; the reference's means no update (or, for DoRA, a re-norm)
        raise ConfigError(f"{where}: lora_config alpha=0 scales the update to nothing; such a file adapts nothing "
                          f"musicdiff can express")
    config = AdapterConfig(kind, rank, alpha)
    layers = LayerMap(diffusion_config)
    wanted = {REFERENCE_TENSOR[name] for name in TENSORS[kind] if name in REFERENCE_TENSOR}
    flat: dict[str, np.ndarray] = {}
    targets: dict[str, Target] = {}
    for key in sorted(tensors):
        module, tensor = _split_key(key, where)
        if tensor not in wanted:
            raise ConfigError(f"{where}: key {key}: a {REFERENCE_TYPE[kind]} file holds {', '.join(sorted(wanted))} "
                              f"tensors, not {tensor}")
        target = layers.checked_target(module, key, where)
        value = checked_cast(tensors[key], np.float32, file=where, key=key)
        if tensor == "magnitude" and value.ndim == 2:  # old files keep (out, 1); the reference squeezes them
            value = value.squeeze()
        shape = expected_shapes(config, target)[OUR_TENSOR[tensor]]
        if value.shape != shape:
            raise ConfigError(f"{where}: key {key} has shape {value.shape}, but {target.param_name} "
                              f"{target.shape} needs {shape} for a rank-{rank} {REFERENCE_TYPE[kind]} adapter")
        flat[f"{target.name}/{OUR_TENSOR[tensor]}"] = value
        targets[target.name] = target
    for name, target in targets.items():
        for tensor in sorted(wanted):
            if f"{name}/{OUR_TENSOR[tensor]}" not in flat:
                raise ConfigError(f"{where}: key {layers.modules[name]}{PARAMETRIZATION}{tensor} is missing; a "
                                  f"{REFERENCE_TYPE[kind]} layer needs {', '.join(sorted(wanted))}")
    if kind == "lora_xs":
        bases = _xs_bases(config, targets, base_params, where)
        flat.update({name: value for name, value in bases.items() if not name.endswith("/xs_m")})
    return AdapterConfig(kind, rank, alpha, include=tuple(sorted(targets))), unflatten_dict(flat, sep="/")


def _xs_bases(config: AdapterConfig, targets: Mapping[str, Target], base_params: BaseParams,
              where: str) -> dict[str, np.ndarray]:
    """{"<layer>/xs_u" | "/xs_v" | "/xs_m": array} computed from the base, as the reference recomputes them."""
    if base_params is None:
        raise ConfigError(f"{where}: a lora-xs file stores only its cores M_xs; its bases are the top singular "
                          f"vectors of the weights it adapts: pass the converted diffusion model's parameters "
                          f"(base_params; --diffusion=DIR)")
    if callable(base_params):  # read the (large) base only now that a LoRA-XS needs it
        base_params = base_params()
    initial = init_adapter(jax.random.key(0), config, targets, dict(base_params))
    return {name: np.asarray(value) for name, value in flatten_dict(initial, sep="/").items()}


def convert_sa3_lora_file(src: str | Path, dst: str | Path, diffusion_config: Any,
                          base_params: BaseParams = None) -> Path:
    """Writes our adapter file (`save_adapter`, float32) of a reference LoRA file; returns its path."""
    config, weights = import_sa3_lora(src, diffusion_config, base_params)
    return save_adapter(dst, config, weights, extra_metadata={"converted_from": f"Stable Audio 3 LoRA {src}"})


# ---------------------------------------------------------------------------------------------------------- export


def export_sa3_lora(path: str | Path, adapter_config: AdapterConfig, weights: Mapping[str, Any],
                    diffusion_config: Any, base_params: BaseParams = None) -> Path:
    """Writes a reference LoRA file (float16 tensors, `lora_config` metadata) of our adapter; returns its path."""
    where = f"adapter for {path}"
    kind = adapter_config.kind
    layers = LayerMap(diffusion_config)
    by_layer = layer_tensors(weights)
    targets: dict[str, Target] = {}
    tensors: dict[str, np.ndarray] = {}
    for layer, values in sorted(by_layer.items()):
        if layer not in layers.modules:
            raise ConfigError(f"{where}: layer {layer} has no Stable Audio 3 counterpart (a reference LoRA adapts "
                              f"the DiT's and the conditioner's Linear / Conv1d layers); exclude it from the adapter")
        module = layers.modules[layer]
        target = layers.checked_target(module, f"{module}.weight", where)
        wanted = expected_shapes(adapter_config, target)
        extra = sorted(set(values) - set(wanted))
        if extra:
            raise ConfigError(f"{where}: tensor {layer}/{extra[0]} is not one of a {kind} adapter's "
                              f"({', '.join(wanted)})")
        for tensor, shape in wanted.items():
            if tuple(np.shape(values.get(tensor, ()))) != shape:
                raise ConfigError(f"{where}: tensor {layer}/{tensor} has shape "
                                  f"{np.shape(values[tensor]) if tensor in values else None}; {target.param_name} "
                                  f"{target.shape} needs {shape} for a rank-{adapter_config.rank} {kind} adapter")
            if tensor in REFERENCE_TENSOR:  # LoRA-XS bases are not saved: the reference recomputes them
                key = f"{module}{PARAMETRIZATION}{REFERENCE_TENSOR[tensor]}"
                tensors[key] = checked_cast(np.asarray(values[tensor], np.float32), np.float16, file=where, key=key)
        targets[layer] = target
    if kind == "lora_xs":
        _check_xs_bases(adapter_config, targets, by_layer, base_params, where)
    include = sorted(layers.modules[layer] for layer in targets)
    _check_include_is_exact(include, layers.reference_modules, where)
    lora_config = {"rank": adapter_config.rank, "alpha": adapter_config.alpha or adapter_config.rank,
                   "adapter_type": REFERENCE_TYPE[kind], "dropout": 0.0, "include": include, "exclude": None}
    from safetensors.numpy import save

    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: json.dumps(lora_config)}))
    return path


def _check_xs_bases(config: AdapterConfig, targets: Mapping[str, Target], by_layer: Mapping[str, Mapping[str, Any]],
                    base_params: BaseParams, where: str) -> None:
    """Refuses LoRA-XS bases other than those the reference will recompute from the base it is applied to."""
    if base_params is None:
        raise ConfigError(f"{where}: a lora-xs file stores only its cores; the reference recomputes the bases from "
                          f"the weights it adapts, so they are checked against the base: pass its parameters "
                          f"(base_params; --diffusion=DIR)")
    recomputed = _xs_bases(config, targets, base_params, where)
    for layer in sorted(targets):
        for tensor in ("xs_u", "xs_v"):
            difference = float(np.max(np.abs(np.asarray(by_layer[layer][tensor]) - recomputed[f"{layer}/{tensor}"])))
            if difference > BASES_TOLERANCE:
                raise ConfigError(f"{where}: tensor {layer}/{tensor} differs by {difference:.2e} from the singular "
                                  f"vectors of this base's weights, which the reference would use instead; export "
                                  f"with the base the adapter was trained on")


def _check_include_is_exact(include: list[str], modules: list[str], where: str) -> None:
    """Each include entry (a substring filter in the reference) must select its own module and no other."""
    for entry in include:
        others = [module for module in modules if entry in module and module != entry]
        if others:
            raise ConfigError(f"{where}: include entry {entry!r} would also select {others[0]} in the reference "
                              f"loader, which matches module names by substring")


def export_sa3_lora_file(src: str | Path, dst: str | Path, diffusion_config: Any,
                         base_params: BaseParams = None) -> Path:
    """Writes the reference LoRA file of our adapter file `src` (launch.train_lora's adapter.safetensors)."""
    config, weights, _ = read_adapter(src)
    return export_sa3_lora(dst, config, weights, diffusion_config, base_params)


def diffusion_base(directory: str | Path) -> tuple[Any, dict[str, Any]]:
    """(config, {"model": params, "conditioner": params}) of a converted diffusion run (launch.convert's
    OUT/diffusion), for the functions above."""
    from musicdiff.checkpoints import find_checkpoint, load_model

    ref = find_checkpoint(directory)
    return ref.config, {section: nnx.state(load_model(ref, section), nnx.Param) for section in SECTION_PREFIXES}


__all__ = ["LayerMap", "convert_sa3_lora_file", "diffusion_base", "export_sa3_lora", "export_sa3_lora_file",
           "import_sa3_lora", "read_sa3_lora"]

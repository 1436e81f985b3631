"""Weight adapters (LoRA, DoRA, LoRA-XS) on any Dense or 1-D convolution of any model, in weight space.

An adapter rewrites chosen kernels W of a parameter tree into W' before the model is built from it (`nnx.merge`), as
Stable Audio 3's parametrizations do (spec §8). The model code is untouched: parameter paths, checkpoints and the
converters' key maps are the same with or without adapters, and stacking, strengths, merging and export are
functions of parameter trees.

Targets: every `attention.Linear` (kernel [*in, *out], its `num_in_axes` split), `nnx.Linear`, 1-D `nnx.Conv`
(kernel [k, in, out]), `oobleck_layers.WNConv1d` (its direction `weight_v` [k, in, out]) and the bare dense kernels a
module declares in its class attribute `adaptable_kernels` ({attribute: in-axes count}, e.g. the T5 encoder's) whose
layer name
("model/transformer/layers/3/self_attn/to_qkv", the names checkpoints use without the parameter's last part) matches
an `include` glob and no `exclude` glob. Each kernel is read as a matrix [in, out] (C-order over its in and out
axes); an adapter's tensors use the PyTorch orientation of that matrix (A [r, in], B [out, r]), so that Stable
Audio 3's adapter files map onto them by a reshape.

Kinds (scaling = alpha / rank; s = the run-time strength):
- "lora":    W' = W + scaling·s·(B A)ᵀ, A Kaiming-uniform (±1/√in), B zeros;               trains A, B
- "dora":    V = W + scaling·s·(B A)ᵀ, W' = m ⊙ V / ‖V‖ with the norm over the in axes per output (SA3's
             "dora-rows"), m initialised to ‖W‖;                                          trains A, B, m
- "lora_xs": W' = W + scaling·s·(U M Vᵀ)ᵀ with U [out, r], V [in, r] the top-r singular vectors of W (frozen, sign
             fixed so that each U column's largest-|·| entry is positive) and M [r, r] zeros;  trains M
Adapted kernels are computed in float32 whatever the base's dtype (a bf16 base stays bf16 in memory); the layers cast
them to their compute dtype as they cast any kernel. Strength 0 (and B = 0 / M = 0) gives W back bit for bit.

Stacking applies adapters in order (W → a₀(W) → a₁(a₀(W))): plain LoRAs add, DoRA re-normalises what it is given.
Each entry of a stack has its own strength and, optionally, a noise-level interval in model time outside which it is
off (the strength is then a traced value; see `AdapterStack`).

Files: `save_adapter` writes safetensors with the tensors under "<layer name>/<tensor>" and the `AdapterConfig` as
JSON in the metadata key "musicdiff_adapter"; `load_adapter` checks every tensor against the model's targets and
names the first one that does not fit.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.checkpoints import flatten_with_names, path_name
from musicdiff.errors import ConfigError, refuse_unknown_options
from musicdiff.files import atomic_write_bytes
from musicdiff.models.attention import Linear
from musicdiff.models.oobleck_layers import WNConv1d
from musicdiff.weight_files import checked_cast, read_safetensors

KINDS = ("lora", "dora", "lora_xs")
TENSORS = {"lora": ("lora_a", "lora_b"), "dora": ("lora_a", "lora_b", "magnitude"),
           "lora_xs": ("xs_u", "xs_v", "xs_m")}
TRAINED = ("lora_a", "lora_b", "magnitude", "xs_m")  # xs_u / xs_v are frozen bases
METADATA_KEY = "musicdiff_adapter"
ADAPTABLE_KERNELS = "adaptable_kernels"  # class attribute {parameter attribute: in-axes count} of bare kernels
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"
    rank: int = 16
    alpha: float = 0.0  # 0: alpha = rank (scaling 1)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"adapter kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.rank < 1:
            raise ConfigError(f"adapter rank={self.rank}: must be 1 or more")

    @property
    def scaling(self) -> float:
        return (self.alpha or self.rank) / self.rank

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "config.lora") -> AdapterConfig:
        refuse_unknown_options(values, (f.name for f in dataclasses.fields(cls)), prefix, "an adapter")
        values = dict(values)
        for key in ("include", "exclude"):
            if key in values:
                value = values[key]
                values[key] = (value,) if isinstance(value, str) else tuple(value)
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Target:
    """One adaptable kernel: `name` (the layer), `param` (its kernel's last path part; "" for a bare kernel, which
    `name` names), shape and in-axes count."""

    name: str
    param: str
    shape: tuple[int, ...]
    in_axes: int

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[: self.in_axes])

    @property
    def out_features(self) -> int:
        return math.prod(self.shape[self.in_axes:])

    @property
    def param_name(self) -> str:
        return f"{self.name}/{self.param}" if self.param else self.name


def _shape(variable: nnx.Variable) -> tuple[int, ...]:
    """A variable's shape, concrete or abstract (nnx.eval_shape modules hold ShapeDtypeStructs)."""
    return tuple(variable.get_value().shape)


def _kernels_of(node: Any) -> list[tuple[str, int]]:
    """(kernel attribute, in-axes count) of each adaptable kernel a module holds directly."""
    if isinstance(node, Linear):
        return [("kernel", node.num_in_axes)]
    if isinstance(node, nnx.Linear):
        return [("kernel", 1)]
    if isinstance(node, nnx.Conv) and len(_shape(node.kernel)) == 3:
        return [("kernel", 2)]
    if isinstance(node, WNConv1d):
        return [("weight_v", 2)]
    # Modules that keep dense kernels as bare parameters declare them (text_encoder/t5.py).
    declared = getattr(type(node), ADAPTABLE_KERNELS, {})
    return [(attribute, in_axes) for attribute, in_axes in declared.items() if getattr(node, attribute, None) is not None]


def find_targets(modules: Mapping[str, nnx.Module], config: AdapterConfig) -> dict[str, Target]:
    """{layer name: Target} of the layers of `modules` ({section: module}, abstract ones do) that `config` selects.
    Refuses an include pattern that selects nothing."""
    targets: dict[str, Target] = {}
    for section, module in modules.items():
        for path, node in nnx.iter_graph(module):
            layer = "/".join([section, *map(str, path)])
            declared = getattr(type(node), ADAPTABLE_KERNELS, {})
            for attribute, in_axes in _kernels_of(node):
                # A layer module's kernel is named by the layer; a bare declared kernel by its own path.
                name, param = (f"{layer}/{attribute}", "") if attribute in declared else (layer, attribute)
                if any(fnmatch.fnmatchcase(name, p) for p in config.include) and \
                        not any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
                    targets[name] = Target(name, param, _shape(getattr(node, attribute)), in_axes)
    if not targets:
        raise ConfigError(f"adapter include={list(config.include)} exclude={list(config.exclude)}: selects no Dense or "
                          f"1-D convolution layer of {', '.join(modules)}; layer names look like "
                          f"'model/transformer/layers/0/self_attn/to_qkv'")
    return targets


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def layer_tensors(weights: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer name: {tensor name: array}} of a nested adapter weight tree."""
    layers: dict[str, dict[str, Any]] = {}
    for name, value in flatten_with_names(weights)[0].items():
        layer, tensor = name.rsplit("/", 1)
        layers.setdefault(layer, {})[tensor] = value
    return layers


def _kernels(params: Any, targets: Mapping[str, Target]) -> dict[str, jax.Array]:
    wanted = {t.param_name: t.name for t in targets.values()}
    found = {wanted[path_name(path)]: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if path_name(path) in wanted}
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise ConfigError(f"adapter target {missing[0]}: the parameter tree has no {targets[missing[0]].param_name}")
    return found


def _row_norm(matrix: jax.Array) -> jax.Array:
    """‖·‖ over the input axis of a [in, out] matrix, per output."""
    return jnp.sqrt(jnp.sum(jnp.square(matrix), axis=0))


def init_adapter(key: jax.Array, config: AdapterConfig, targets: Mapping[str, Target], params: Any) -> dict[str, Any]:
    """Fresh adapter weights for `targets` of the base `params` ({section: state}); a nested dict by layer name."""
    kernels = _kernels(params, targets) if config.kind != "lora" else {}
    flat: dict[str, jax.Array] = {}
    for index, (name, target) in enumerate(sorted(targets.items())):
        n_in, n_out, r = target.in_features, target.out_features, config.rank
        if config.kind in ("lora", "dora"):
            bound = 1.0 / math.sqrt(n_in)  # Kaiming-uniform with a = √5, as nn.Linear's (and SA3's lora_A) init
            flat[f"{name}/lora_a"] = jax.random.uniform(jax.random.fold_in(key, index), (r, n_in), jnp.float32,
                                                        -bound, bound)
            flat[f"{name}/lora_b"] = jnp.zeros((n_out, r), jnp.float32)
        if config.kind == "dora":
            flat[f"{name}/magnitude"] = _row_norm(kernels[name].astype(jnp.float32).reshape(n_in, n_out))
        if config.kind == "lora_xs":
            u, v = _svd_bases(kernels[name].astype(jnp.float32).reshape(n_in, n_out).T, r)
            flat[f"{name}/xs_u"], flat[f"{name}/xs_v"] = u, v
            flat[f"{name}/xs_m"] = jnp.zeros((r, r), jnp.float32)
    return _nested(flat)


def _svd_bases(matrix: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-`rank` left / right singular vectors of `matrix` [out, in], each U column's largest-|·| entry positive."""
    if rank > min(matrix.shape):
        raise ConfigError(f"lora_xs rank={rank}: a [{matrix.shape[0]}, {matrix.shape[1]}] kernel has only "
                          f"{min(matrix.shape)} singular vectors; lower the rank or exclude the layer")
    u, _, vt = jnp.linalg.svd(matrix, full_matrices=False)
    u, v = u[:, :rank], vt[:rank].T
    signs = jnp.sign(jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None], axis=0))[0]
    signs = jnp.where(signs == 0, 1.0, signs)
    return u * signs, v * signs


def delta(kind: str, tensors: Mapping[str, jax.Array]) -> jax.Array:
    """The unscaled low-rank update as a [in, out] matrix (the transposed PyTorch-orientation product)."""
    if kind == "lora_xs":
        return tensors["xs_v"] @ tensors["xs_m"].T @ tensors["xs_u"].T
    return tensors["lora_a"].T @ tensors["lora_b"].T


def adapt_kernel(kernel: jax.Array, target: Target, config: AdapterConfig, tensors: Mapping[str, jax.Array],
                 strength: float | jax.Array) -> jax.Array:
    """One adapter applied to one kernel, in float32."""
    base = kernel.astype(jnp.float32)
    matrix = base.reshape(target.in_features, target.out_features)
    update = config.scaling * strength * delta(config.kind, tensors)
    if config.kind != "dora":
        return (matrix + update).reshape(kernel.shape)
    direction = matrix + update
    adapted = direction * (tensors["magnitude"] / (_row_norm(direction) + _NORM_EPS))
    # Strength 0 turns the adapter off exactly (the magnitude would otherwise still re-normalise W).
    return jnp.where(jnp.asarray(strength) == 0, matrix, adapted).reshape(kernel.shape)


@dataclasses.dataclass(frozen=True)
class StackEntry:
    """One adapter of a stack: its config and targets (static), its strength and model-time interval."""

    config: AdapterConfig
    targets: Mapping[str, Target]
    strength: float = 1.0
    interval: tuple[float, float] | None = None  # model-time bounds; None = every noise level


def apply_adapters(params: Any, stack: Sequence[StackEntry], weights: Sequence[Mapping[str, Any]],
                   t: jax.Array | None = None) -> Any:
    """`params` ({section: state}) with the adapters of `stack` (weights[i] for stack[i]) applied in order.

    `t` (model time; one value per call, as samplers give, or [B] with equal rows) switches off entries whose
    interval excludes it. Entries of strength 0 are skipped. Adapted kernels come back in float32."""
    per_param: dict[str, list[tuple[AdapterConfig, Target, dict[str, Any], Any]]] = {}
    for entry, tree in zip(stack, weights, strict=True):
        strength: Any = float(entry.strength)
        if entry.interval is not None:
            if t is None:
                raise ValueError("an adapter with a noise-level interval needs the model time t")
            now = jnp.reshape(jnp.asarray(t, jnp.float32), (-1,))[0]
            strength = strength * ((now >= entry.interval[0]) & (now <= entry.interval[1])).astype(jnp.float32)
        elif strength == 0.0:
            continue
        for layer, tensors in layer_tensors(tree).items():
            target = entry.targets[layer]
            per_param.setdefault(target.param_name, []).append((entry.config, target, tensors, strength))
    if not per_param:
        return params

    def adapt(path, leaf):
        for config, target, tensors, strength in per_param.get(path_name(path), ()):
            leaf = adapt_kernel(leaf, target, config, tensors, strength)
        return leaf

    return jax.tree_util.tree_map_with_path(adapt, params)


def merge_adapters(params: Any, stack: Sequence[StackEntry], weights: Sequence[Mapping[str, Any]]) -> Any:
    """`params` with the stack folded into the kernels, in the base's dtypes (for export; intervals refused)."""
    if any(entry.interval is not None for entry in stack):
        raise ConfigError("an adapter with a noise-level interval cannot be merged into fixed weights; drop its "
                          "interval to merge it")
    merged = apply_adapters(params, stack, weights)
    return jax.tree.map(lambda new, old: new.astype(old.dtype), merged, params)


class TimedAdapters:
    """A denoiser built per call from `params` with the stack applied at the call's model time (for stacks with
    noise-level intervals; a stack without any is folded into the weights once instead). Declares the base
    denoiser's capabilities."""

    def __init__(self, graphdef: Any, params: Any, section: str, stack: Sequence[StackEntry],
                 weights: Sequence[Mapping[str, Any]]):
        self.graphdef, self.params, self.section = graphdef, params, section
        self.stack, self.weights = tuple(stack), tuple(weights)
        self.capabilities = frozenset(getattr(nnx.merge(graphdef, params), "capabilities", frozenset()))

    def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, **extras: Any) -> jax.Array:
        adapted = apply_adapters({self.section: self.params}, self.stack, self.weights, t=t)[self.section]
        return nnx.merge(self.graphdef, adapted)(x, t, cond, **extras)


def run_adapter(ref: Any, modules: Mapping[str, nnx.Module]) -> tuple[StackEntry, dict[str, Any]] | None:
    """(entry, weights) of the adapter an adapter run's checkpoint (`CheckpointRef` of launch.train_lora) holds, its
    EMA when saved; None for other checkpoints. Generating from such a run gives the base with its adapter."""
    from musicdiff.checkpoints import restore_params_only

    if "lora" not in ref.config or not ref.has_subtree("params/adapter"):
        return None
    config = AdapterConfig.from_mapping({k: v for k, v in dict(ref.config.lora).items() if k != "base_dtype"})
    targets = find_targets(modules, config)
    params = {name: nnx.state(module, nnx.Param) for name, module in modules.items()}
    abstract = jax.eval_shape(lambda p: init_adapter(jax.random.key(0), config, targets, p), params)
    subtree = "ema/adapter" if ref.has_subtree("ema/adapter") else "params/adapter"
    return StackEntry(config, targets), restore_params_only(ref.step_dir, abstract, subtree=subtree)


def untimed(stack: Sequence[StackEntry]) -> list[StackEntry]:
    """The stack with its intervals dropped (for parts that run once per generation, such as the conditioner)."""
    return [dataclasses.replace(entry, interval=None) for entry in stack]


def trainable(name: str) -> bool:
    """Whether the adapter tensor named `name` (".../<tensor>") trains."""
    return name.rsplit("/", 1)[-1] in TRAINED


def parameter_count(weights: Mapping[str, Any]) -> tuple[int, int]:
    """(trained, stored) numbers of values of an adapter."""
    flat, _ = flatten_with_names(weights)
    stored = sum(int(np.prod(np.shape(v))) for v in flat.values())
    trained = sum(int(np.prod(np.shape(v))) for k, v in flat.items() if trainable(k))
    return trained, stored


# ---------------------------------------------------------------------------------------------------------- files


def save_adapter(path: str | Path, config: AdapterConfig, weights: Mapping[str, Any], *,
                 dtype: Any = np.float32, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Writes the adapter as safetensors (atomically); its config goes to the metadata."""
    from safetensors.numpy import save

    flat, _ = flatten_with_names(weights)
    tensors = {name: np.ascontiguousarray(np.asarray(value, dtype)) for name, value in flat.items()}
    metadata = {METADATA_KEY: config.to_json(), **dict(extra_metadata or {})}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def read_adapter(path: str | Path) -> tuple[AdapterConfig, dict[str, Any], dict[str, str]]:
    """(config, nested float32 weights, metadata) of an adapter file (float16 and bfloat16 files are cast exactly;
    a NaN or inf value is refused with its tensor's name), unchecked against any model."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"adapter file {path}: not found; pass the .safetensors file launch.train_lora wrote "
                          f"(WORKDIR/adapter.safetensors)")
    stored, metadata = read_safetensors(path, "adapter file")
    if METADATA_KEY not in metadata:
        raise ConfigError(f"adapter file {path}: its metadata has no '{METADATA_KEY}' entry; it was not written by "
                          f"musicdiff's save_adapter (convert other formats first)")
    config = AdapterConfig.from_mapping(json.loads(metadata[METADATA_KEY]), prefix=f"{path} metadata")
    flat = {name: checked_cast(value, np.float32, file=f"adapter file {path}", key=name)
            for name, value in stored.items()}
    return config, _nested(flat), metadata


def expected_shapes(config: AdapterConfig, target: Target) -> dict[str, tuple[int, ...]]:
    r, n_in, n_out = config.rank, target.in_features, target.out_features
    shapes = {"lora_a": (r, n_in), "lora_b": (n_out, r), "magnitude": (n_out,), "xs_u": (n_out, r),
              "xs_v": (n_in, r), "xs_m": (r, r)}
    return {name: shapes[name] for name in TENSORS[config.kind]}


def check_fits(weights: Mapping[str, Any], config: AdapterConfig, modules: Mapping[str, nnx.Module],
               where: str) -> dict[str, Target]:
    """The targets of `modules` the adapter's tensors address; refuses the first tensor that has no layer or the
    wrong shape, and a layer missing a tensor."""
    every = find_targets(modules, dataclasses.replace(config, include=("*",), exclude=()))
    targets: dict[str, Target] = {}
    for layer, tensors in sorted(layer_tensors(weights).items()):
        if layer not in every:
            raise ConfigError(f"{where}: tensor {layer}/{next(iter(tensors))} adapts layer {layer}, which this model "
                              f"does not have (its layers look like {next(iter(every))}); load it onto the model it "
                              f"was trained for")
        wanted = expected_shapes(config, every[layer])
        for tensor in sorted(set(wanted) | set(tensors)):
            shape = tuple(np.shape(tensors[tensor])) if tensor in tensors else None
            if shape != wanted.get(tensor):
                raise ConfigError(f"{where}: tensor {layer}/{tensor} has shape {shape}, but this model's "
                                  f"{every[layer].param_name} {every[layer].shape} needs {wanted.get(tensor)} for a "
                                  f"rank-{config.rank} {config.kind} adapter")
        targets[layer] = every[layer]
    return targets


def load_adapter(path: str | Path, modules: Mapping[str, nnx.Module], *, strength: float = 1.0,
                 interval: tuple[float, float] | None = None) -> tuple[StackEntry, dict[str, Any]]:
    """(stack entry, weights) of an adapter file, checked against `modules` ({section: module}, abstract is fine)."""
    config, weights, _ = read_adapter(path)
    targets = check_fits(weights, config, modules, f"adapter file {path}")
    return StackEntry(config, targets, float(strength), interval), jax.tree.map(jnp.asarray, weights)


def parse_adapter_specs(specs: Iterable[str] | str) -> list[tuple[str, float]]:
    """"PATH[:STRENGTH]" entries (a comma-separated string or a list) -> [(path, strength)]."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    parsed = []
    for spec in specs:
        path, _, tail = str(spec).strip().rpartition(":")
        try:
            parsed.append((path.strip(), float(tail)) if path else (tail, 1.0))
        except ValueError:  # no strength given: the colon belongs to the path
            parsed.append((str(spec).strip(), 1.0))
    return parsed


__all__ = ["KINDS", "AdapterConfig", "StackEntry", "Target", "adapt_kernel", "apply_adapters", "check_fits", "delta",
           "TimedAdapters", "find_targets", "init_adapter", "layer_tensors", "load_adapter", "merge_adapters", "parameter_count",
           "parse_adapter_specs", "read_adapter", "run_adapter", "save_adapter", "trainable", "untimed"]

"""Tensor-by-tensor map between a stable-audio-tools state dict and musicdiff parameter trees (spec §9).

A `TensorRule` ties one reference tensor (key without its group prefix, torch layout) to one parameter path of a
musicdiff section, with the two layout transforms. Rules are generated from the *abstract* musicdiff model (shapes
only), so the map, the shapes and the "no key left over" checks cost no memory at any model size.

Layouts (the musicdiff side is documented in oobleck_layers.py, dit.py, attention.py, conditioning.py):
- Linear: torch weight [out, in] -> kernel [*in_shape, *out_shape] = W.T reshaped; fused outputs are head-major
  `(h d)` and ordered q|k|v, k|v, or value|gate (SwiGLU); bias [out] -> out_shape.
- WN-Conv1d: weight_v [out, in, k] -> [k, in, out]; weight_g [out, 1, 1] -> [out].
- WN-ConvTranspose1d: weight_v [in, out, k] -> [k, in, out]; weight_g [in, 1, 1] -> [in] (per input channel).
- 1x1 Conv1d (DiT pre/post): [C, C, 1] -> kernel [C_in, C_out].
- Buffers: LayerNorm `beta` (zeros) and rotary `inv_freq` have no musicdiff parameter. Import checks their values
  (a non-zero beta would change the numbers) and drops them; export writes them back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from musicdiff.models.attention import LayerNorm, Linear, RMSNorm, rotary_inv_freq
from musicdiff.models.autoencoder import OobleckAutoencoder
from musicdiff.models.conditioning import MultiConditioner, NumberConditioner, TextConditioner
from musicdiff.models.dit import DiT, FourierFeatures
from musicdiff.models.oobleck_layers import Snake, WNConv1d, WNConvTranspose1d

Path = tuple[Any, ...]
Transform = Callable[[np.ndarray], np.ndarray]

# Groups of a diffusion_cond state dict (spec §9.1) and the musicdiff section each one fills.
DIT_PREFIX = "model.model."
CONDITIONER_PREFIX = "conditioner.conditioners."
PRETRANSFORM_PREFIX = "pretransform.model."


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One reference tensor. `path` None marks a buffer with the fixed value `buffer`."""

    key: str
    reference_shape: tuple[int, ...]
    path: Path | None
    to_ours: Transform
    to_reference: Transform
    buffer: np.ndarray | None = None


def _contiguous(fn: Transform) -> Transform:
    return lambda array: np.ascontiguousarray(fn(np.asarray(array)))


def identity_rule(key: str, path: Path, shape: tuple[int, ...]) -> TensorRule:
    same = _contiguous(lambda a: a)
    return TensorRule(key, tuple(shape), path, same, same)


def linear_weight_rule(key: str, path: Path, kernel_shape: tuple[int, ...], num_in_axes: int) -> TensorRule:
    in_shape, out_shape = kernel_shape[:num_in_axes], kernel_shape[num_in_axes:]
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    return TensorRule(key, (fan_out, fan_in), path,
                      _contiguous(lambda w: w.T.reshape(kernel_shape)),
                      _contiguous(lambda k: k.reshape(fan_in, fan_out).T))


def reshape_rule(key: str, path: Path, reference_shape: tuple[int, ...], shape: tuple[int, ...]) -> TensorRule:
    return TensorRule(key, tuple(reference_shape), path, _contiguous(lambda a: a.reshape(shape)),
                      _contiguous(lambda a: a.reshape(reference_shape)))


def buffer_rule(key: str, value: np.ndarray) -> TensorRule:
    value = np.asarray(value, np.float32)
    return TensorRule(key, value.shape, None, _contiguous(lambda a: a), _contiguous(lambda a: a), buffer=value)


def _param_shapes(module: nnx.Module) -> dict[Path, tuple[int, ...]]:
    return {tuple(path): tuple(var.get_value().shape)
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _modules(root: nnx.Module) -> Iterable[tuple[Path, nnx.Module]]:
    for path, node in nnx.iter_graph(root):
        if isinstance(node, nnx.Module):
            yield tuple(path), node


def _torch_key(path: Path) -> str:
    return ".".join(str(part) for part in path)


def linear_rules(key: str, path: Path, module: Linear, shapes: Mapping[Path, tuple[int, ...]]) -> list[TensorRule]:
    kernel = shapes[path + ("kernel",)]
    rules = [linear_weight_rule(f"{key}.weight", path + ("kernel",), kernel, module.num_in_axes)]
    if module.bias is not None:
        bias = shapes[path + ("bias",)]
        rules.append(reshape_rule(f"{key}.bias", path + ("bias",), (math.prod(bias),), bias))
    return rules


# ---- Oobleck -------------------------------------------------------------------------------------------------

def oobleck_rules(model: OobleckAutoencoder) -> list[TensorRule]:
    """Keys `encoder.layers...` / `decoder.layers...` (spec §9.4); musicdiff names its modules identically."""
    shapes = _param_shapes(model)
    rules = []
    for path, module in _modules(model):
        if path[:1] not in (("encoder",), ("decoder",)):
            continue
        key = _torch_key(path)
        if isinstance(module, WNConv1d):
            k, cin, cout = shapes[path + ("weight_v",)]
            rules.append(TensorRule(f"{key}.weight_v", (cout, cin, k), path + ("weight_v",),
                                    _contiguous(lambda v: v.transpose(2, 1, 0)),
                                    _contiguous(lambda v: v.transpose(2, 1, 0))))
            rules.append(reshape_rule(f"{key}.weight_g", path + ("weight_g",), (cout, 1, 1), (cout,)))
            if module.bias is not None:
                rules.append(identity_rule(f"{key}.bias", path + ("bias",), (cout,)))
        elif isinstance(module, WNConvTranspose1d):
            k, cin, cout = shapes[path + ("weight_v",)]
            rules.append(TensorRule(f"{key}.weight_v", (cin, cout, k), path + ("weight_v",),
                                    _contiguous(lambda v: v.transpose(2, 0, 1)),
                                    _contiguous(lambda v: v.transpose(1, 2, 0))))
            rules.append(reshape_rule(f"{key}.weight_g", path + ("weight_g",), (cin, 1, 1), (cin,)))
            rules.append(identity_rule(f"{key}.bias", path + ("bias",), (cout,)))
        elif isinstance(module, Snake):
            for name in ("alpha", "beta"):
                rules.append(identity_rule(f"{key}.{name}", path + (name,), shapes[path + (name,)]))
    return rules


# ---- DiT -----------------------------------------------------------------------------------------------------

# musicdiff submodule name -> reference name, where they differ.
_DIT_RENAMES = {"in_proj": "0", "out_proj": "2"}


def _dit_key(path: Path) -> str:
    parts = [str(p) for p in path]
    if parts[-1] in _DIT_RENAMES and (parts[-2].startswith("to_") or parts[-2] == "global_cond_embedder"):
        parts[-1] = _DIT_RENAMES[parts[-1]]
    if len(parts) >= 2 and parts[-2] == "ff":  # FeedForward(proj, out) is ff.ff.0.proj / ff.ff.2 there
        parts[-1:] = ["ff", "0", "proj"] if parts[-1] == "proj" else ["ff", "2"]
    return ".".join(parts)


def dit_rules(model: DiT) -> list[TensorRule]:
    """Keys below `model.model.` (spec §9.2), with the LayerNorm beta and rotary inv_freq buffers. Stable Audio 3's
    options add `transformer.memory_tokens` [M, E], `transformer.global_cond_embedder.{0,2}`, per block
    `to_scale_shift_gate` [6E] (ours [6, E]) and RMSNorm `gamma`s (q/k norms included); its ExpoFourier timestep
    features have no tensor."""
    config = model.config
    shapes = _param_shapes(model)
    rules = []
    if isinstance(model.timestep_features, FourierFeatures):
        rules.append(reshape_rule("timestep_features.weight", ("timestep_features", "weight"),
                                  (config.timestep_features_dim // 2, 1), (config.timestep_features_dim // 2,)))
    for path in shapes:
        if path[-1] == "memory_tokens":
            rules.append(identity_rule(_torch_key(path), path, shapes[path]))
        elif path[-1] == "to_scale_shift_gate":
            rules.append(reshape_rule(_torch_key(path), path, (math.prod(shapes[path]),), shapes[path]))
    for path, module in _modules(model):
        if isinstance(module, Linear):
            if path[-1] in ("preprocess_conv", "postprocess_conv"):
                channels = shapes[path + ("kernel",)][0]
                rules.append(TensorRule(f"{path[-1]}.weight", (channels, channels, 1), path + ("kernel",),
                                        _contiguous(lambda w: w[:, :, 0].T), _contiguous(lambda k: k.T[:, :, None])))
            else:
                rules.extend(linear_rules(_dit_key(path), path, module, shapes))
        elif isinstance(module, RMSNorm):
            rules.append(identity_rule(f"{_torch_key(path)}.gamma", path + ("scale",), shapes[path + ("scale",)]))
        elif isinstance(module, LayerNorm):
            key = _torch_key(path)
            qk_norm = path[-1] in ("q_norm", "k_norm")  # nn.LayerNorm: weight / bias
            if module.scale is not None:
                rules.append(identity_rule(f"{key}.{'weight' if qk_norm else 'gamma'}", path + ("scale",),
                                           shapes[path + ("scale",)]))
            if module.bias is not None:
                rules.append(identity_rule(f"{key}.bias", path + ("bias",), shapes[path + ("bias",)]))
            elif not qk_norm:
                rules.append(buffer_rule(f"{key}.beta", np.zeros((config.embed_dim,), np.float32)))
    inv_freq = 1.0 / (config.rotary_base ** (np.arange(0, config.rotary_dim, 2, dtype=np.float32)
                                             / np.float32(config.rotary_dim)))
    np.testing.assert_allclose(inv_freq, rotary_inv_freq(config.rotary_dim, config.rotary_base), rtol=1e-6)
    rules.append(buffer_rule("transformer.rotary_pos_emb.inv_freq", inv_freq))
    return rules


# ---- conditioners --------------------------------------------------------------------------------------------

def conditioner_rules(model: MultiConditioner) -> list[TensorRule]:
    """Keys below `conditioner.conditioners.` (spec §9.3): number embedders, t5 output projections and learned
    padding embeddings (Stable Audio 3's prompt). An "expo" number embedder's features have no tensor: its Linear is
    `embedder.embedding.1` as in SAO."""
    shapes = _param_shapes(model)
    rules = []
    for cond_id, conditioner in model.conditioners.items():
        path = ("conditioners", cond_id)
        if isinstance(conditioner, NumberConditioner):
            kernel = shapes[path + ("kernel",)]
            if path + ("frequencies",) in shapes:
                rules.append(identity_rule(f"{cond_id}.embedder.embedding.0.weights", path + ("frequencies",),
                                           shapes[path + ("frequencies",)]))
            rules += [linear_weight_rule(f"{cond_id}.embedder.embedding.1.weight", path + ("kernel",), kernel, 1),
                      identity_rule(f"{cond_id}.embedder.embedding.1.bias", path + ("bias",), shapes[path + ("bias",)])]
        elif isinstance(conditioner, TextConditioner):
            if conditioner.encoder is not None:
                raise ValueError(f"conditioner '{cond_id}' owns a trainable text encoder, which stable-audio-tools "
                                 f"has no conditioner for")
            if conditioner.project:
                kernel = shapes[path + ("kernel",)]
                rules += [linear_weight_rule(f"{cond_id}.proj_out.weight", path + ("kernel",), kernel, 1),
                          identity_rule(f"{cond_id}.proj_out.bias", path + ("bias",), shapes[path + ("bias",)])]
            if conditioner.padding_mode == "learned":
                rules.append(identity_rule(f"{cond_id}.padding_embedding", path + ("padding_embedding",),
                                           shapes[path + ("padding_embedding",)]))
        else:
            raise ValueError(f"conditioner '{cond_id}' ({type(conditioner).__name__}) has no stable-audio-tools key "
                             f"layout")
    return rules


def prefixed(rules: Iterable[TensorRule], prefix: str) -> list[TensorRule]:
    return [dataclasses.replace(rule, key=prefix + rule.key) for rule in rules]


__all__ = ["CONDITIONER_PREFIX", "DIT_PREFIX", "PRETRANSFORM_PREFIX", "TensorRule", "conditioner_rules",
           "dit_rules", "oobleck_rules", "prefixed"]

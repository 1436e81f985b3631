"""Tensor-by-tensor map between a Stable Audio 3 SAME state dict (stable_audio_3.md §9.2) and the parameters of
musicdiff's "same" autoencoder (musicdiff/models/same.py).

Reference keys (below an optional prefix, `pretransform.model.` inside full SA3 checkpoints, none in
`stabilityai/SAME-*`): `encoder.layers.0.*` (TRB), `encoder.layers.2.*` (Linear), `decoder.layers.1.*` (Linear),
`decoder.layers.3.*` (TRB), `bottleneck.*`. musicdiff's module paths are the same, so a key is its parameter path
joined by dots, except:
- FeedForward `ff.proj` / `ff.out` are the reference's `ff.ff.0.proj` / `ff.ff.2` (its nn.Sequential);
- Linear weights [out, in] become kernels [*in_shape, *out_shape] (`to_qkv`: [D, parts, heads, head_dim], parts
  in the reference's q|k|v|q₂|k₂ order; `ff.proj`: [D, 2, inner], value half first);
- WN-Conv1d mapping: weight_v [out, in, k] → [k, in, out], weight_g [out, 1, 1] → [out];
- bottleneck scaling_factor / bias (1, D, 1) → [D]; running_std (1,) as is;
- buffers with no musicdiff parameter: every block's `rope.inv_freq` (base 10000, head_dim/2 rotary dims) and the
  empty `bottleneck.noise_scaling_factor` (1, 0, 1). Import checks their values; export writes them.

    params = same_params_from_state_dict(state, config.autoencoder, prefix="pretransform.model.")
    nnx.replace_by_pure_dict(abstract_or_built_state, params)
    state = same_state_dict_from_params(nnx.state(model, nnx.Param), config.autoencoder)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from musicdiff.convert.stable_audio_keys import (TensorRule, _modules, _param_shapes, _torch_key, buffer_rule,
                                                 identity_rule, linear_rules, prefixed, reshape_rule)
from musicdiff.errors import DataError
from musicdiff.models.attention import Linear
from musicdiff.models.oobleck_layers import WNConv1d
from musicdiff.models.same import SAMEAutoencoder
from musicdiff.models.same_layers import DynamicTanh, SAMEBlock, TransformerResamplingBlock


def _rope_inv_freq(head_dim: int) -> np.ndarray:
    """The reference's RotaryEmbedding(head_dim // 2).inv_freq, computed as torch does in float32."""
    dim = head_dim // 2
    return (1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _key(path: tuple[Any, ...]) -> str:
    parts = [str(p) for p in path]
    if len(parts) >= 2 and parts[-2] == "ff" and parts[-1] in ("proj", "out"):
        parts[-1:] = ["ff", "0", "proj"] if parts[-1] == "proj" else ["ff", "2"]
    return ".".join(parts)


def same_rules(model: SAMEAutoencoder) -> list[TensorRule]:
    """Every reference tensor of `model` (abstract or built) with its parameter path and layout transforms."""
    shapes = _param_shapes(model)
    config = model.config
    rules: list[TensorRule] = []
    for path, module in _modules(model):
        key = _torch_key(path)
        if isinstance(module, Linear):
            rules.extend(linear_rules(_key(path), path, module, shapes))
        elif isinstance(module, WNConv1d):
            k, cin, cout = shapes[path + ("weight_v",)]
            rules.append(TensorRule(f"{key}.weight_v", (cout, cin, k), path + ("weight_v",),
                                    lambda v: np.ascontiguousarray(np.asarray(v).transpose(2, 1, 0)),
                                    lambda v: np.ascontiguousarray(np.asarray(v).transpose(2, 1, 0))))
            rules.append(reshape_rule(f"{key}.weight_g", path + ("weight_g",), (cout, 1, 1), (cout,)))
            if module.bias is not None:
                rules.append(identity_rule(f"{key}.bias", path + ("bias",), (cout,)))
        elif isinstance(module, DynamicTanh):
            for name in ("alpha", "gamma", "beta"):
                rules.append(identity_rule(f"{key}.{name}", path + (name,), shapes[path + (name,)]))
        elif isinstance(module, SAMEBlock):
            rules.append(buffer_rule(f"{key}.rope.inv_freq", _rope_inv_freq(config.head_dim)))
        elif isinstance(module, TransformerResamplingBlock):
            rules.append(identity_rule(f"{key}.new_tokens", path + ("new_tokens",), shapes[path + ("new_tokens",)]))
    dim = config.latent_dim
    for name in ("scaling_factor", "bias"):
        rules.append(reshape_rule(f"bottleneck.{name}", ("bottleneck", name), (1, dim, 1), (dim,)))
    rules.append(identity_rule("bottleneck.running_std", ("bottleneck", "running_std"), (1,)))
    rules.append(buffer_rule("bottleneck.noise_scaling_factor", np.ones((1, 0, 1), np.float32)))
    return rules


def same_params_from_state_dict(state: Mapping[str, Any], config: Any, prefix: str = "", *,
                                name: str = "state dict") -> dict:
    """The parameters of a "same" model of `config` (its autoencoder section) as a nested dict of arrays
    (`nnx.replace_by_pure_dict` takes it), from reference tensors keyed `prefix + key`, through the converters'
    shared checks (sa3_dit_keys.params_from_state_dict): the first missing key, unknown key under `prefix`, shape
    mismatch, non-finite tensor or buffer with another value is refused by name; keys outside `prefix` are ignored."""
    from musicdiff.convert.sa3_dit_keys import params_from_state_dict  # it imports the converter, which needs us

    return params_from_state_dict("autoencoder", state, _section(config), prefix, name).to_pure_dict()


def same_state_dict_from_params(params: nnx.State | Mapping[str, Any], config: Any,
                                prefix: str = "") -> dict[str, np.ndarray]:
    """Reference tensors (torch layout, float32, buffers included) keyed `prefix + key`, from the parameters of a
    "same" model (an nnx.State of its Params, or the nested dict `same_params_from_state_dict` returns)."""
    from musicdiff.convert.sa3_dit_keys import state_dict_from_params

    return state_dict_from_params("autoencoder", params, _section(config), prefix)


def _section(config: Any) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict(dict(config))
    if section.get("name", "same") != "same":
        raise DataError(f"config.autoencoder.name={section.name!r}: these keys are SAME's")
    section.name = "same"
    return section


__all__ = ["same_params_from_state_dict", "same_rules", "same_state_dict_from_params"]

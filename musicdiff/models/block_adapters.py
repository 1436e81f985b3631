"""Per-block adapter modules of the transformer denoisers, registered by name (`config.model.adapter.name`).

An adapter is built once per transformer block, `builder(config, block_index, options, rngs)`, and lives in its own
parameter subtree (`transformer/adapters/<i>/...`), so the blocks' parameter paths and the checkpoint converters'
key mappings are the same with or without adapters, and an optimiser can train the adapters alone
(`training.trainable`). At run time block i adds `adapter_i(h, **adapter_inputs)` to its hidden state after its
cross-attention; `adapter_inputs` are the denoiser's keyword extra of that name (models/denoiser.py).

Built in:
- "cross_attention": decoupled cross-attention (IP-Adapter / MuseControlLite): LayerNorm, then attention from the
  hidden state to `adapter_inputs["tokens"]` [B, S, width] (optional `adapter_inputs["mask"]` [B, S]), output
  projection zero-initialised so a fresh adapter leaves the denoiser unchanged; `scale` (default 1) multiplies it.
  Options: `width` (the tokens' width, default the embedding width), `scale`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from musicdiff.errors import ConfigError
from musicdiff.models.attention import CrossAttention, LayerNorm

if TYPE_CHECKING:
    from musicdiff.models.transformer import TransformerConfig

AdapterBuilder = Callable[["TransformerConfig", int, Mapping[str, Any], nnx.Rngs], nnx.Module]
_BUILDERS: dict[str, AdapterBuilder] = {}


def register_block_adapter(name: str) -> Callable[[AdapterBuilder], AdapterBuilder]:
    def wrap(builder: AdapterBuilder) -> AdapterBuilder:
        _BUILDERS[name] = builder
        return builder

    return wrap


def names() -> list[str]:
    return sorted(_BUILDERS)


def build(config: TransformerConfig, index: int, rngs: nnx.Rngs) -> nnx.Module:
    """Block `index`'s adapter for `config.adapter` (("name", ...), option pairs)."""
    options = dict(config.adapter)
    name = options.pop("name")
    if name not in _BUILDERS:
        raise ConfigError(f"{config.prefix}.adapter.name='{name}': no such block adapter; registered: "
                          f"{', '.join(names())}")
    return _BUILDERS[name](config, index, options, rngs)


class CrossAttentionAdapter(nnx.Module):
    def __init__(self, config: TransformerConfig, width: int, scale: float, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.norm = LayerNorm(config.embed_dim, eps=config.layer_norm_eps, dtype=config.compute_dtype,
                              param_dtype=config.weight_dtype)
        self.attention = CrossAttention(config.embed_dim, width, config.num_heads, zero_init_out=True,
                                        qk_norm=config.qk_norm, **kw)
        self.scale = float(scale)

    def __call__(self, h: jax.Array, *, tokens: jax.Array, mask: jax.Array | None = None,
                 **unused: Any) -> jax.Array:
        if mask is None:
            mask = jnp.ones(tokens.shape[:2], bool)
        return self.scale * self.attention(self.norm(h), tokens.astype(h.dtype), mask)


@register_block_adapter("cross_attention")
def build_cross_attention(config: TransformerConfig, index: int, options: Mapping[str, Any],
                          rngs: nnx.Rngs) -> CrossAttentionAdapter:
    unknown = sorted(set(options) - {"width", "scale"})
    if unknown:
        raise ConfigError(f"{config.prefix}.adapter.{unknown[0]}: not an option of the cross_attention adapter "
                          f"(width, scale)")
    return CrossAttentionAdapter(config, int(options.get("width", config.embed_dim)),
                                 float(options.get("scale", 1.0)), rngs)


__all__ = ["CrossAttentionAdapter", "build", "names", "register_block_adapter"]

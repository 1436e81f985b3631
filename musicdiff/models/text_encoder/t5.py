"""T5 encoder network in Flax NNX (spec §5.2), following Hugging Face's `T5EncoderModel`.

Token embedding (`shared`), per layer RMSNorm -> self-attention -> residual, RMSNorm -> feed-forward -> residual, then
a final RMSNorm. T5 specifics:
- attention logits are not scaled by 1/sqrt(d_kv) (T5 folds that into the query init);
- one learned relative-position bias (bidirectional buckets) lives in layer 0 and is reused by every later layer;
  here it is a top-level parameter `relative_attention_bias` [num_buckets, heads];
- RMSNorm has no mean subtraction and no bias; variance, softmax and norms run in float32 whatever the compute dtype;
- feed-forward is ReLU (`wi`, `wo`; t5-base) or gated (`wi_0` activation x `wi_1`; v1.1 "gated-gelu" = tanh GELU).
The output is `(embeddings * mask, mask)`: padded positions are zeroed as the SAO T5Conditioner does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.errors import ConfigError
from musicdiff.models.text_encoder.layers import (ACTIVATIONS, AttentionKernels, FeedForward, RMSNorm,
                                                  dot_product_attention, embed_tokens, normal, padding_bias)
from musicdiff.parallel.sharding import constrain

# feed_forward_proj's ACT: the activations T5 configs name ("gelu_pytorch_tanh" is Gemma's name for gelu_new).
_ACTIVATIONS = {name: ACTIVATIONS[name] for name in ("relu", "gelu", "gelu_new", "silu")}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of a T5 `config.json` that the encoder needs (defaults: t5-base)."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "T5EncoderConfig":
        """Picks the known fields out of a T5 config.json (or a config section); other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: values[k] for k in names if k in values})
        config.activation  # validates feed_forward_proj early
        return config

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # Hugging Face maps "gated-gelu" to the tanh approximation (gelu_new); other names are taken literally.
        name = "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]
        if name not in _ACTIVATIONS or len(self.feed_forward_proj.split("-")) > 2:
            raise ConfigError(
                f"feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT' with ACT one of "
                f"{', '.join(_ACTIVATIONS)}"
            )
        return name


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets [query, key] of (key - query): half the buckets per direction, exact up to
    num_buckets/4, then logarithmic up to max_distance. Float32 in the same order as Hugging Face, so the truncation
    at exact powers of two lands in the same bucket."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5Attention(AttentionKernels):
    """Multi-head self-attention without 1/sqrt(d) scaling; q/k/v kernels [d_model, heads, d_kv], out [heads, d_kv,
    d_model]. Initialised as Hugging Face's T5 (the query std carries the missing 1/sqrt(d_kv))."""

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        d, h, k = config.d_model, config.num_heads, config.d_kv
        super().__init__(d, h, h, k, query_std=(d * k) ** -0.5, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x [B, T, D]; bias [B or 1, heads, T, T] float32 (relative positions plus the padding mask)."""
        q, k, v = self.project(x)
        return self.output(dot_product_attention(q, k, v, bias, dtype=self.dtype))


class T5Block(nnx.Module):
    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.attention_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.attention = T5Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.ff = FeedForward(config.d_model, config.d_ff, config.activation, config.is_gated, rngs=rngs,
                              dtype=dtype, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        x = x + self.dropout(self.attention(self.attention_norm(x), bias), deterministic=rngs is None, rngs=rngs)
        return x + self.dropout(self.ff(self.ff_norm(x)), deterministic=rngs is None, rngs=rngs)


class T5Encoder(nnx.Module):
    """`(input_ids [B, T] int, attention_mask [B, T]) -> (embeddings [B, T, d_model] with pads zeroed, mask bool)`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (float32 unless asked). Dropout only runs
    when an `rngs` is passed to the call (training the embedded encoder); without it the encoder is deterministic.
    """

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.shared = nnx.Param(normal(rngs, (config.vocab_size, config.d_model), 1.0, param_dtype),
                                out_sharding=("vocab", "embed"))
        self.relative_attention_bias = nnx.Param(
            normal(rngs, (config.relative_attention_num_buckets, config.num_heads), config.d_model**-0.5, param_dtype),
            out_sharding=(None, "heads"),
        )
        self.blocks = nnx.List(
            [T5Block(config, rngs=rngs, dtype=self.dtype, param_dtype=param_dtype) for _ in range(config.num_layers)]
        )
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def position_bias(self, length: int) -> jax.Array:
        """[1, heads, T, T] float32 relative-position bias, shared by every layer."""
        buckets = relative_position_buckets(length, length, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance)
        values = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), jnp.asarray(buckets), axis=0)
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *, rngs: nnx.Rngs | None = None,
                 token_offsets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`token_offsets` [B, T, d_model], if given, is added to the token embeddings (the number-aware encoder's
        values of numbers, text_encoder/numbers.py)."""
        mask = attention_mask.astype(bool)
        x = embed_tokens(self.shared, input_ids, self.dtype)
        if token_offsets is not None:
            x = x + token_offsets.astype(self.dtype)
        x = self.dropout(x, deterministic=rngs is None, rngs=rngs)
        bias = self.position_bias(input_ids.shape[1]) + padding_bias(mask)
        for block in self.blocks:
            x = block(x, bias, rngs)
            x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = self.dropout(self.final_layer_norm(x), deterministic=rngs is None, rngs=rngs)
        return x * mask[..., None].astype(x.dtype), mask

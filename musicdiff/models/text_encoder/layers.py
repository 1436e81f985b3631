"""Pieces the text encoders share (t5.py, t5gemma.py): normal initialisers, activations by their Hugging Face names,
the float32 RMSNorm, the (gated) feed-forward and the additive mask bias of self-attention."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from musicdiff.parallel.sharding import constrain

# Hugging Face activation names -> functions ("gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@functools.partial(jax.jit, static_argnums=(1, 3))
def _scaled_normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    # One compiled program per shape: eager init would otherwise compile sample, scale and cast separately.
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: Any) -> jax.Array:
    """N(0, std²) of `shape`, drawn in float32 and stored in `dtype`."""
    return _scaled_normal(rngs.params(), tuple(shape), std, jnp.dtype(dtype))


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x²) + eps) times a learned scale; no mean subtraction, no bias, statistics in float32.

    T5 multiplies by `scale` (initialised to 1); Gemma stores the offset from 1 and multiplies by `1 + scale`
    (`unit_offset`, initialised to 0), so the same checkpoint values load into either as they are."""

    def __init__(self, dim: int, eps: float, *, unit_offset: bool = False, param_dtype: Any = jnp.float32):
        init = jnp.zeros if unit_offset else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        # Both multiply in float32 and cast once (Gemma: `(x * (1 + w)).to(dtype)`, not `x.to(dtype) * w`).
        return ((1.0 + scale if self.unit_offset else scale) * normed).astype(x.dtype)


class AttentionKernels(nnx.Module):
    """The bias-free projections of multi-head self-attention: query [dim, heads, head_dim], key and value [dim,
    kv_heads, head_dim] (kv_heads < heads: grouped-query attention), out [heads, head_dim, dim]. Subclasses (the T5
    and T5Gemma attentions) say how queries meet keys."""

    adaptable_kernels = {"query": 1, "key": 1, "value": 1, "out": 2}  # weight adapters' targets (in-axes counts)

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, *, query_std: float, rngs: nnx.Rngs,
                 dtype: Any, param_dtype: Any):
        names = ("embed", "heads", "kv")
        self.query = nnx.Param(normal(rngs, (dim, heads, head_dim), query_std, param_dtype), out_sharding=names)
        self.key = nnx.Param(normal(rngs, (dim, kv_heads, head_dim), dim**-0.5, param_dtype), out_sharding=names)
        self.value = nnx.Param(normal(rngs, (dim, kv_heads, head_dim), dim**-0.5, param_dtype), out_sharding=names)
        self.out = nnx.Param(normal(rngs, (heads, head_dim, dim), (heads * head_dim) ** -0.5, param_dtype),
                             out_sharding=("heads", "kv", "embed"))
        self.dtype = dtype

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, dim] -> q [B, T, heads, head_dim], k and v [B, T, kv_heads, head_dim] in the compute dtype."""
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(self.dtype))
                   for kernel in (self.query, self.key, self.value))
        return constrain(q, ("activation_batch", "activation_length", "activation_heads", None)), k, v

    def output(self, context: jax.Array) -> jax.Array:
        """context [B, T, heads, head_dim] -> [B, T, dim]."""
        return jnp.einsum("bqhk,hkd->bqd", context, self.out[...].astype(self.dtype))


def embed_tokens(table: nnx.Param, input_ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows of the [vocab, dim] embedding table for `input_ids` [B, T], in `dtype`, laid out as activations."""
    # Gathering from the fsdp-split table directly makes XLA rematerialise it; all-gather its embed dim first.
    x = jnp.take(constrain(table[...], ("vocab", None)), input_ids, axis=0).astype(dtype)
    return constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class FeedForward(nnx.Module):
    """wo(act(wi x)), or gated wo(act(wi x) * wi_gate x) (T5 v1.1's gated-gelu, Gemma's GeGLU); no biases."""

    adaptable_kernels = {"wi": 1, "wi_gate": 1, "wo": 1}  # weight adapters' targets (in-axes counts)

    def __init__(self, dim: int, hidden: int, activation: str, gated: bool, *, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        self.gated = gated
        self.wi = nnx.Param(normal(rngs, (dim, hidden), dim**-0.5, param_dtype), out_sharding=("embed", "mlp"))
        if gated:
            self.wi_gate = nnx.Param(normal(rngs, (dim, hidden), dim**-0.5, param_dtype),
                                     out_sharding=("embed", "mlp"))
        self.wo = nnx.Param(normal(rngs, (hidden, dim), hidden**-0.5, param_dtype), out_sharding=("mlp", "embed"))
        self.activation = ACTIVATIONS[activation]
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.activation(x @ self.wi[...].astype(self.dtype))
        if self.gated:
            hidden = hidden * (x @ self.wi_gate[...].astype(self.dtype))
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return hidden @ self.wo[...].astype(self.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, dtype: Any,
                          scale: float = 1.0, softcap: float | None = None) -> jax.Array:
    """q, k, v [B, T, heads, K] -> context [B, T, heads, K]. Logits, their scale and tanh soft-capping
    (softcap · tanh(logits / softcap), Gemma), the bias and the softmax all run in float32 whatever `dtype` is; only
    the weights are cast back to `dtype` for the weighted sum."""
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits = logits * jnp.float32(scale)
    if softcap:
        logits = jnp.tanh(logits / jnp.float32(softcap)) * jnp.float32(softcap)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(dtype)
    return jnp.einsum("bhqs,bshk->bqhk", weights, v)


def padding_bias(mask: jax.Array, allowed_pairs: jax.Array | None = None) -> jax.Array:
    """[B, T] bool (True = a real token) -> [B, 1, T or 1, T] float32 added to attention logits: padded keys, and
    (query, key) pairs outside `allowed_pairs` [T, T] bool if given, get the most negative float32, as Hugging Face's
    eager attention adds finfo.min where its mask is off. One where over the combined mask, never a sum of two
    finfo.min (that overflows to -inf, and a query with every key masked would then give NaN)."""
    allowed = mask[:, None, None, :]
    if allowed_pairs is not None:
        allowed = allowed & allowed_pairs[None, None]
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)

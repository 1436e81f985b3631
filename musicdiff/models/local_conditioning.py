"""Per-block additive local conditioning (Stable Audio 3's `local_add_cond`, spec §3.2 step 8 and §5).

A denoiser with `local_cond_dim` D > 0 takes `local_cond` [B, D, L] (time-aligned with the latents; for inpainting
D = io_channels + 1: the keep mask, then the latents times the mask, spec §5) and every transformer block adds
`to_local_embed(local)` to its hidden state after cross-attention and before the feed-forward:

    to_local_embed = Linear(D·p -> E, bias) -> SiLU -> Linear(E -> E, bias, zero-initialised)

on the patched tokens [B, L/p, p·D] (p = patch_size, frames laid out as the latents'), the prepended conditioning
token of "sao" blocks getting zero. The zero-initialised output makes a fresh model with the input compute exactly
what the model without it does. An absent input is all zeros, which is what text-to-audio feeds (SA3's FULL_MASK):
the MLP still runs on it (its biases make the branch nonzero once trained), so None and zeros agree always.

Parameters (per block, `transformer.layers.N.to_local_embed.{in_proj,out_proj}.{kernel,bias}`, the SA3 keys
`transformer.layers.N.to_local_embed.{0,2}.{weight,bias}`): in_proj [D·p, E] with axes (None, "embed"), out_proj
[E, E] with ("mlp", "embed"), as the DiT's other condition MLPs, so FSDP shards both kernels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from musicdiff.models.attention import Linear


class LocalEmbed(nnx.Module):
    """[B, N, D·p] local features -> [B, prepend + N, E] additive update (zero on the prepended tokens)."""

    def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear((in_dim,), (dim,), (None, "embed"), **kw)
        self.out_proj = Linear((dim,), (dim,), ("mlp", "embed"), zero_init=True, **kw)

    def __call__(self, local: jax.Array, prepend_length: int = 0) -> jax.Array:
        out = self.out_proj(jax.nn.silu(self.in_proj(local)))
        if prepend_length:
            out = jnp.pad(out, ((0, 0), (prepend_length, 0), (0, 0)))
        return out


def local_tokens(local: jax.Array | None, dim: int, batch: int, length: int, patch_size: int,
                 dtype: Any) -> jax.Array:
    """`local_cond` [B, dim, L] (None: zeros) as patched tokens [B, L/p, p·dim], frames in the latents' layout."""
    if local is None:
        local = jnp.zeros((batch, dim, length), dtype)
    if local.shape != (batch, dim, length):
        raise ValueError(f"DiT: local_cond has shape {local.shape}; expected [{batch} (batch), {dim} "
                         f"(config.model.local_cond_dim), {length} latent frames]")
    tokens = jnp.swapaxes(local.astype(dtype), 1, 2)
    return tokens.reshape(batch, length // patch_size, patch_size * dim)


__all__ = ["LocalEmbed", "local_tokens"]

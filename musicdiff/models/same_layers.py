"""Layers of the SAME autoencoder (stable_audio_3.md §2.3): DynamicTanh norms, differential self-attention with
partial rotary, the sin-gated GLU, the SAME transformer block, the two linear-cost attention patterns (chunks with a
midpoint shift, banded sliding window) and the Transformer Resampling Block that folds learned "new tokens" into the
sequence and reads them back out.

Layout: activations are `[B, L, D]`; parameter names follow the reference's state dict below each block
(`pre_norm`, `self_attn.{to_qkv,q_norm,k_norm,to_out}`, `ff_norm`, `ff`), see musicdiff/convert/same_keys.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.models.attention import ACTIVATION_HEADS, Linear, apply_rotary, attention, rotary_angles
from musicdiff.models.oobleck_layers import WNConv1d
from musicdiff.models.remat import checkpointed
from musicdiff.models.transformer import FeedForward
from musicdiff.parallel.sharding import constrain

DYT_INIT_ALPHA = 4.0
ROTARY_BASE = 10000.0
# The reference's Sin activation multiplies by this literal, not by math.pi.
SIN_GATE_PI = 3.14159265359


class RunningStatistic(nnx.Param):
    """A parameter set by the training pass itself rather than by the optimiser (the reference's
    `requires_grad=False` nn.Parameter, e.g. SoftNorm's running_std). It lives with the params, so checkpoints, EMA,
    sharding and parameter counts see it; the model reads it under stop_gradient, and the autoencoder trainer
    writes the value the training pass leaves in the module over the optimiser's update."""


class DynamicTanh(nnx.Module):
    """DyT: gamma · tanh(alpha · x) + beta, alpha one scalar, gamma and beta per channel (computed in fp32)."""

    def __init__(self, dim: int, *, axis_name: str | None = "norm"):
        self.alpha = nnx.Param(jnp.full((1,), DYT_INIT_ALPHA, jnp.float32), out_sharding=(None,))
        self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,))
        self.beta = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tanh(self.alpha[...] * x.astype(jnp.float32))
        return (self.gamma[...] * y + self.beta[...]).astype(x.dtype)


class GatedFeedForward(FeedForward):
    """The reference GLU FeedForward: value · SiLU(gate), or value · sin(π · gate) in its "sinusoidal" blocks."""

    def __init__(self, dim: int, mult: int, *, sinusoidal: bool, rngs: nnx.Rngs, dtype: Any):
        super().__init__(dim, mult, rngs=rngs, zero_init_out=True, dtype=dtype, param_dtype=jnp.float32)
        self.sinusoidal = sinusoidal

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.sinusoidal:
            return super().__call__(x)
        h = self.proj(x)
        return self.out(h[..., 0, :] * jnp.sin(SIN_GATE_PI * h[..., 1, :]))


def banded_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: tuple[int, int], group: int) -> jax.Array:
    """Attention where query i sees keys i − window[0] … i + window[1] (flash-attn's window_size), at linear cost:
    queries go in groups of `group`, each against the `group + window[0] + window[1]` keys its members can reach
    (gathered from zero-padded k/v, as the MLX port's `_swa`), with a band mask inside that window. No L×L array.

    q, k, v `[B, L, H, d]` with L a multiple of `group`."""
    batch, length, heads, head_dim = q.shape
    left, right = window
    groups, span = length // group, group + left + right
    if groups * group != length:
        raise ValueError(f"banded attention: length {length} is not a multiple of the query group {group}")
    # Window of group g: padded positions g·group + s, i.e. sequence positions g·group − left + s.
    index = np.arange(groups)[:, None] * group + np.arange(span)[None, :]
    position = index - left
    offset = position[:, None, :] - (np.arange(groups)[:, None, None] * group + np.arange(group)[None, :, None])
    mask = (offset >= -left) & (offset <= right) & (position >= 0)[:, None, :] & (position < length)[:, None, :]

    def windows(x):
        padded = jnp.pad(x, ((0, 0), (left, right), (0, 0), (0, 0)))
        return jnp.take(padded, jnp.asarray(index.reshape(-1)), axis=1).reshape(batch * groups, span, heads,
                                                                                head_dim)

    grouped_q = q.reshape(batch * groups, group, heads, head_dim)
    mask = jnp.broadcast_to(jnp.asarray(mask)[None], (batch, groups, group, span)).reshape(batch * groups, 1, group,
                                                                                             span)
    out = attention(grouped_q, windows(k), windows(v), mask=mask)
    return out.reshape(batch, length, heads, head_dim)


class DifferentialSelfAttention(nnx.Module):
    """Self-attention of a SAME block: `to_qkv` gives q, k, v (and q₂, k₂ when differential, in that order), DyT
    qk-norm over the head dim (one norm shared by q and q₂, one by k and k₂), rotary on the first head_dim/2 dims
    with positions 0 … L−1 of the sequence it is given, then softmax(q kᵀ/√d) v − softmax(q₂ k₂ᵀ/√d) v (no λ, no
    group norm), heads merged, `to_out` without bias."""

    def __init__(self, dim: int, head_dim: int, *, differential: bool, rngs: nnx.Rngs, dtype: Any):
        heads = dim // head_dim
        self.parts = 5 if differential else 3
        self.to_qkv = Linear((dim,), (self.parts, heads, head_dim), ("embed", None, "heads", "kv"), use_bias=False,
                             rngs=rngs, dtype=dtype)
        self.q_norm = DynamicTanh(head_dim, axis_name="kv")
        self.k_norm = DynamicTanh(head_dim, axis_name="kv")
        self.to_out = Linear((heads, head_dim), (dim,), ("heads", "kv", "embed"), use_bias=False, zero_init=True,
                             rngs=rngs, dtype=dtype)
        self.rotary_dim = head_dim // 2

    def __call__(self, x: jax.Array, window: tuple[int, int] | None, group: int) -> jax.Array:
        """x `[B, L, D]`; `window` None: every token sees the whole of x, else `banded_attention(window, group)`."""
        qkv = self.to_qkv(x)  # [B, L, parts, heads, head_dim]
        cos, sin = rotary_angles(x.shape[1], self.rotary_dim, ROTARY_BASE)

        def prepare(index, norm):
            part = norm(constrain(qkv[:, :, index], ACTIVATION_HEADS))
            return apply_rotary(part, cos, sin)

        def attend(q, k, v):
            if window is None:
                return attention(q, k, v)
            return banded_attention(q, k, v, window, group)

        v = constrain(qkv[:, :, 2], ACTIVATION_HEADS)
        out = attend(prepare(0, self.q_norm), prepare(1, self.k_norm), v)
        if self.parts == 5:
            out = out - attend(prepare(3, self.q_norm), prepare(4, self.k_norm), v)
        return self.to_out(constrain(out, ACTIVATION_HEADS))


class SAMEBlock(nnx.Module):
    """Pre-norm residual block: x += attn(DyT(x)); x += ff(DyT(x)). Branch outputs start at zero."""

    def __init__(self, dim: int, head_dim: int, ff_mult: int, *, differential: bool, sinusoidal: bool,
                 rngs: nnx.Rngs, dtype: Any):
        self.pre_norm = DynamicTanh(dim)
        self.self_attn = DifferentialSelfAttention(dim, head_dim, differential=differential, rngs=rngs, dtype=dtype)
        self.ff_norm = DynamicTanh(dim)
        self.ff = GatedFeedForward(dim, ff_mult, sinusoidal=sinusoidal, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, window: tuple[int, int] | None, group: int) -> jax.Array:
        x = x + self.self_attn(self.pre_norm(x), window, group)
        return x + self.ff(self.ff_norm(x))


class TransformerResamplingBlock(nnx.Module):
    """One TRB (reference `TransformerResamplingBlock`, variable stride, no prepend/cross conditioning).

    Encoder: patches `[B, P, in]` → zero-pad P (to a multiple of `chunk_size`, or of `stride` with a sliding window)
    → weight-normed conv mapping in → D → every `stride` tokens followed by one learned new token → blocks → the
    new token of each group → `[B, P/stride, D]`.
    Decoder: `[B, T, D]` → zero-pad T (to a multiple of chunk_size/stride, or not at all) → each token followed by
    `stride` new tokens → blocks → those `stride` outputs → `[B, T·stride, D]` → mapping D → out. Padded frames are
    not trimmed here (the reference does not either); SAMEAutoencoder trims.

    Attention: "chunked" runs the blocks on non-overlapping chunks of chunk_size + chunk_size/stride tokens with
    rotary positions restarting in each chunk; with `midpoint_shift`, the second half of the blocks runs on chunks
    moved by half a chunk, the sequence extended by copies of its first and last half chunk, which are dropped after.
    "sliding_window" runs them on the whole sequence with banded attention of ±window·(stride+1) tokens.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, *, stride: int, depth: int, head_dim: int,
                 ff_mult: int, attention_kind: str, chunk_size: int, midpoint_shift: bool, window: int,
                 differential: bool, variable_stride: bool, mapping_kernel: int, sinusoidal_blocks: int,
                 remat: bool, rngs: nnx.Rngs, dtype: Any):
        self.kind, self.stride, self.depth, self.remat = kind, stride, depth, remat
        self.attention_kind, self.chunk_size, self.midpoint_shift = attention_kind, chunk_size, midpoint_shift
        self.group = stride + 1  # one sub-chunk: `stride` tokens and the one they resample to (or from)
        self.window = (window * self.group, window * self.group)
        width = out_channels if kind == "encoder" else in_channels
        self.new_token_count = stride if kind == "decoder" else 1
        self.mapping = WNConv1d(in_channels, out_channels, mapping_kernel, rngs=rngs, dtype=dtype)
        # The reference draws them as 1e-5 · N(0, 1).
        shape = (1, 1 if variable_stride else self.new_token_count, width)
        self.new_tokens = nnx.Param(1e-5 * jax.random.normal(rngs.params(), shape, jnp.float32),
                                    out_sharding=(None, None, "embed"))
        # Block i has a sin gate iff depth − i < sinusoidal_blocks (the reference's rule).
        self.transformers = nnx.List([
            SAMEBlock(width, head_dim, ff_mult, differential=differential, sinusoidal=depth - i < sinusoidal_blocks,
                      rngs=rngs, dtype=dtype) for i in range(depth)])
        self.dtype = dtype

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_size + self.chunk_size // self.stride

    def _run(self, blocks: list[SAMEBlock], x: jax.Array, window: tuple[int, int] | None) -> jax.Array:
        for block in blocks:
            if self.remat:
                x = checkpointed(lambda b, h: b(h, window, self.group), block, x)
            else:
                x = block(x, window, self.group)
        return x

    def _chunked(self, blocks: list[SAMEBlock], x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        chunks = x.reshape(batch * (length // self.chunk_tokens), self.chunk_tokens, width)
        return self._run(blocks, chunks, None).reshape(batch, length, width)

    def _transform(self, x: jax.Array) -> jax.Array:
        blocks = list(self.transformers)
        if self.attention_kind == "sliding_window":
            return self._run(blocks, x, self.window)
        if not self.midpoint_shift:
            return self._chunked(blocks, x)
        split, shift = self.depth // 2, self.chunk_tokens // 2
        x = self._chunked(blocks[:split], x)
        x = jnp.concatenate([x[:, :shift], x, x[:, -shift:]], axis=1)  # whole sub-chunks, in order
        return self._chunked(blocks[split:], x)[:, shift:-shift]

    def _pad(self, x: jax.Array, multiple: int) -> jax.Array:
        extra = -x.shape[1] % multiple
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0))) if extra else x

    def __call__(self, x: jax.Array) -> jax.Array:
        chunked = self.attention_kind == "chunked"
        if self.kind == "encoder":
            # Padded before the mapping, so padding is the mapping of silence, as the reference.
            x = self.mapping(self._pad(x, self.chunk_size if chunked else self.stride))
            inputs, width = x.reshape(x.shape[0], -1, self.stride, x.shape[-1]), x.shape[-1]
        else:
            x = self._pad(x, self.chunk_size // self.stride if chunked else 1)
            inputs, width = x[:, :, None, :], x.shape[-1]
        batch, frames = inputs.shape[:2]
        new = jnp.broadcast_to(self.new_tokens[...].astype(x.dtype), (batch, frames, self.new_token_count, width))
        tokens = jnp.concatenate([inputs, new], axis=2).reshape(batch, frames * self.group, width)
        tokens = constrain(tokens, ("activation_batch", "activation_length", "activation_embed"))
        out = self._transform(tokens).reshape(batch, frames, self.group, width)[:, :, -self.new_token_count:]
        out = out.reshape(batch, frames * self.new_token_count, width)
        return out if self.kind == "encoder" else self.mapping(out)


__all__ = ["DynamicTanh", "DifferentialSelfAttention", "GatedFeedForward", "RunningStatistic", "SAMEBlock",
           "TransformerResamplingBlock", "banded_attention"]

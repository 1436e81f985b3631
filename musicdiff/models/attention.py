"""DiT building blocks: projections with logical axis names, bias-free LayerNorm, partial rotary embeddings and
self-/cross-attention (spec §2.4): heads-major softmax attention on CPU, `jax.nn.dot_product_attention` elsewhere or
when an implementation is named.

Kernels keep their head structure as separate dimensions ([embed, 3, heads, head_dim] rather than [embed, 3·embed]),
so tensor parallelism splits whole heads and q/k/v (or SwiGLU halves) never end up on different devices. The
PyTorch fused weights map onto them by a transpose and a reshape (spec §9.2, head-major, q | k | v order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.parallel.sharding import constrain, split_count

ACTIVATION_HEADS = ("activation_batch", "activation_length", "activation_heads", None)


def torch_default_kernel_init(num_in_axes: int, num_out_axes: int):
    """PyTorch's nn.Linear default, U(±1/sqrt(fan_in)), with fan_in over the leading `num_in_axes` dimensions."""
    return nnx.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform",
        in_axis=tuple(range(num_in_axes)), out_axis=tuple(range(num_in_axes, num_in_axes + num_out_axes)),
    )


class Linear(nnx.Module):
    """y = x · W (+ b) contracting the trailing `len(in_shape)` dims of x with a kernel [*in_shape, *out_shape].

    `names` are the logical axis names of the kernel; the bias takes the names of the output dimensions.
    `zero_init` zeroes kernel and bias (the reference's zero-initialised branch outputs).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence[str | None], *,
                 use_bias: bool, rngs: nnx.Rngs, zero_init: bool = False, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if len(names) != len(in_shape) + len(out_shape):
            raise ValueError(f"Linear: {len(names)} axis names for a kernel of shape {in_shape + out_shape}")
        self.num_in_axes = len(in_shape)
        self.names = tuple(names)
        self.dtype = dtype
        shape = in_shape + out_shape
        if zero_init:
            kernel = jnp.zeros(shape, param_dtype)
        else:
            kernel = torch_default_kernel_init(len(in_shape), len(out_shape))(rngs.params(), shape, param_dtype)
        self.kernel = nnx.Param(kernel, out_sharding=tuple(names))
        if use_bias:
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            bias = (jnp.zeros(out_shape, param_dtype) if zero_init
                    else jax.random.uniform(rngs.params(), out_shape, param_dtype, -bound, bound))
            self.bias = nnx.Param(bias, out_sharding=tuple(names[len(in_shape):]))
        else:
            self.bias = None

    def _as_matrix_product(self, x: jax.Array) -> bool:
        """Whether to run as one [M, K] x [K, N] GEMM. Merging dimensions keeps a sharded layout only when no
        dimension after the first of each merged group is split: the kernel's trailing in and out dims, and the
        activation's length (merged into M with the batch)."""
        n = self.num_in_axes
        trailing = self.names[1:n] + self.names[n + 1:]
        lead_split = x.ndim - n > 1 and split_count("activation_length") > 1
        return not lead_split and all(split_count(name) == 1 for name in trailing)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.num_in_axes
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self._as_matrix_product(x):
            # A plain 2-D GEMM: with multi-dimensional kernels XLA:CPU otherwise lays the backward pass out with
            # transposed copies of kernels and activations (a third of the DiT step's time on CPU).
            lead, in_shape, out_shape = x.shape[:x.ndim - n], kernel.shape[:n], kernel.shape[n:]
            y = (x.reshape(math.prod(lead), math.prod(in_shape))
                 @ kernel.reshape(math.prod(in_shape), math.prod(out_shape))).reshape(*lead, *out_shape)
        else:
            contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
            y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm without a bias (the reference's beta is a zero buffer), statistics in fp32.

    `use_scale=False` gives the parameter-free norm that adaLN-Zero modulates; `use_bias=True` adds a learned bias
    (the reference's qk-norm is a full nn.LayerNorm).
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, use_scale: bool = True, use_bias: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """x · rsqrt(mean(x²) + eps) · scale in fp32 (the reference's RMSNorm: F.rms_norm with its `gamma`)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


NORM_TYPES = ("layer_norm", "rms_norm")


def make_norm(norm_type: str, dim: int, *, eps: float, use_scale: bool = True, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32) -> LayerNorm | RMSNorm:
    """A block's pre/cross/ff norm: bias-free LayerNorm (SAO) or RMSNorm (Stable Audio 3)."""
    if norm_type == "rms_norm":
        if not use_scale:
            raise ValueError("norm_type='rms_norm' always has a scale; adaLN-Zero blocks use layer_norm")
        return RMSNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
    return LayerNorm(dim, eps=eps, use_scale=use_scale, dtype=dtype, param_dtype=param_dtype)


QK_NORMS = ("none", "ln", "rms")
QK_NORM_EPS = 1e-6  # the reference's qk_norm_eps (nn.LayerNorm or RMSNorm over head_dim)


def qk_norms(qk_norm: str, head_dim: int, dtype: Any, param_dtype: Any
             ) -> tuple[LayerNorm | RMSNorm | None, LayerNorm | RMSNorm | None]:
    """(q_norm, k_norm) over the head dim after the head split and before rotary, as the reference's
    `attn_kwargs.qk_norm`: "ln" affine LayerNorm with bias (SAO Small), "rms" RMSNorm (Stable Audio 3); "none" gives
    (None, None). Differential attention normalises both query/key pairs with the same norm, as the reference."""
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm={qk_norm!r}: expected one of {', '.join(QK_NORMS)}")
    if qk_norm == "none":
        return None, None
    if qk_norm == "rms":
        make = lambda: RMSNorm(head_dim, eps=QK_NORM_EPS, dtype=dtype, param_dtype=param_dtype)
    else:
        make = lambda: LayerNorm(head_dim, eps=QK_NORM_EPS, use_bias=True, dtype=dtype, param_dtype=param_dtype)
    return make(), make()


def _normalised(norm: nnx.Module | None, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x).astype(x.dtype)


class ConditionMLP(nnx.Module):
    """Linear -> SiLU -> Linear (the reference's Sequential indices 0 and 2), [..., in_dim] -> [..., *out_shape].

    Both kernels carry "embed" on their output so FSDP shards them; the hidden is "mlp" for tensor parallelism.
    `out_shape` defaults to (dim,); Stable Audio 3's global_cond_embedder gives (6, dim), its adaLN chunks.
    """

    def __init__(self, in_dim: int, dim: int, in_name: str | None, *, use_bias: bool, rngs: nnx.Rngs, dtype,
                 param_dtype, out_shape: Sequence[int] | None = None):
        kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        out_shape = tuple(out_shape or (dim,))
        self.in_proj = Linear((in_dim,), (dim,), (in_name, "embed"), **kw)
        self.out_proj = Linear((dim,), out_shape, ("mlp",) + (None,) * (len(out_shape) - 1) + ("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_proj(jax.nn.silu(self.in_proj(x)))


def rotary_dim(head_dim: int, min_dim: int = 32) -> int:
    """The reference rotates max(head_dim/2, 32) dims (spec §2.2): 32 of 64 for SAO, 64 of 128 for SAO-small."""
    dim = max(head_dim // 2, min_dim)
    if dim > head_dim or dim % 2:
        raise ValueError(f"rotary dim {dim} must be even and at most the head dim {head_dim}; lower rotary_min_dim")
    return dim


def rotary_inv_freq(dim: int, base: float = 10000.0) -> np.ndarray:
    """inv_freq[j] = base^(-2j/dim), j < dim/2: the reference's `rotary_pos_emb.inv_freq` buffer."""
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def rotary_angles(length: int, dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin [length, dim] of the angles n·inv_freq[j], duplicated as cat(f, f) (split-halves layout)."""
    angles = np.arange(length, dtype=np.float64)[:, None] * rotary_inv_freq(dim, base)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first `cos.shape[-1]` dims of x [B, L, heads, head_dim] in fp32; the rest pass through.

    Split-halves convention: pairs are (x_j, x_{j+dim/2}), each rotated by its angle, out = r·cos + cat(-r2, r1)·sin.
    """
    dim = cos.shape[-1]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :dim], xf[..., dim:]
    r1, r2 = rot[..., : dim // 2], rot[..., dim // 2:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = rot * cos + jnp.concatenate([-r2, r1], axis=-1) * sin
    return jnp.concatenate([rotated, rest], axis=-1).astype(x.dtype)


# Above this many bytes of fp32 scores, heads_major_attention runs one (batch, head) at a time: each head's [T, S]
# scores then stay in cache from q·kᵀ through softmax to p·v. Materialised over all heads, those passes are
# memory-bound on CPU (1025 tokens, SAO: 290 -> 150 ms per self-attention); short sequences keep one batched pass.
PER_HEAD_SCORES_BYTES = 8 << 20


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q·kᵀ/√d)·v over the last two dims of q [..., T, d], k/v [..., S, d]; mask broadcasts to [..., T, S]."""
    logits = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.float32(-0.7 * np.finfo(np.float32).max))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...ts,...sh->...th", probs, v)


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q·kᵀ/√d)·v for q [B, T, N, d], k/v [B, S, K, d] (K divides N; query head i reads kv head i // (N/K),
    as `jax.nn.dot_product_attention` groups them), mask [B, 1|N, 1|T, S] bool. The same arithmetic as jax's XLA
    implementation (fp32 logits and softmax, probabilities cast to v's dtype) with the heads moved in front first:
    XLA:CPU runs the [B, N, T, S] score tensor of the BTNH einsums as strided passes, 2x slower at 1025 tokens.
    Long sequences go head by head (PER_HEAD_SCORES_BYTES), with the same arithmetic per head."""
    (batch, length, num_heads, head_dim), kv_heads, keys = q.shape, k.shape[2], k.shape[1]
    if kv_heads != num_heads:
        k, v = (jnp.repeat(a, num_heads // kv_heads, axis=2) for a in (k, v))
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, N, T, d]
    if batch * num_heads * length * keys * 4 <= PER_HEAD_SCORES_BYTES:
        return jnp.swapaxes(_softmax_attention(q, k, v, mask), 1, 2)
    heads = batch * num_heads
    q, k, v = (a.reshape(heads, *a.shape[2:]) for a in (q, k, v))
    if mask is None:
        out = jax.lax.map(lambda qkv: _softmax_attention(*qkv, None), (q, k, v))
    else:
        mask = jnp.broadcast_to(mask, (batch, num_heads, *mask.shape[2:])).reshape(heads, *mask.shape[2:])
        out = jax.lax.map(lambda qkvm: _softmax_attention(*qkvm), (q, k, v, mask))
    return jnp.swapaxes(out.reshape(batch, num_heads, length, head_dim), 1, 2)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
    """`implementation` None: heads_major_attention on the CPU backend, jax.nn.dot_product_attention's own choice
    elsewhere (cuDNN flash attention where it applies); "xla" / "cudnn": jax.nn.dot_product_attention with it."""
    if implementation is None and jax.default_backend() == "cpu":
        return heads_major_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention with partial rotary on q and k. An optional key mask [B, L] (True =
    a real token) removes padded keys from every query's softmax: the reference's GPU varlen path, not its CPU
    "V-zeroing" (spec §3.4). Without one there is no mask at all, as the reference.

    `differential` (Stable Audio 3 medium): a second query/key pair shares the values and its attention is
    subtracted, out = softmax(q·kᵀ)·v − softmax(q₂·k₂ᵀ)·v, with no λ (the reference); to_qkv then gives
    [embed, 5, heads, head_dim] in the reference's chunk order q, k, v, q₂, k₂.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, zero_init_out: bool = True,
                 implementation: str | None = None, qk_norm: str = "none", differential: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.implementation = implementation
        self.differential = differential
        self.q_norm, self.k_norm = qk_norms(qk_norm, head_dim, dtype, param_dtype)
        self.to_qkv = Linear((dim,), (5 if differential else 3, num_heads, head_dim), ("embed", None, "heads", "kv"),
                             use_bias=False, **kw)
        self.to_out = Linear((num_heads, head_dim), (dim,), ("heads", "kv", "embed"), use_bias=False,
                             zero_init=zero_init_out, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        qkv = self.to_qkv(x)  # [B, L, 3 or 5, heads, head_dim]
        mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]

        def attend(q, k, v):
            q, k = (constrain(a, ACTIVATION_HEADS) for a in (q, k))
            q, k = _normalised(self.q_norm, q), _normalised(self.k_norm, k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            return attention(q, k, v, mask=mask, implementation=self.implementation)

        v = constrain(qkv[:, :, 2], ACTIVATION_HEADS)
        out = attend(qkv[:, :, 0], qkv[:, :, 1], v)
        if self.differential:
            out = out - attend(qkv[:, :, 3], qkv[:, :, 4], v)
        return self.to_out(constrain(out, ACTIVATION_HEADS))


class CrossAttention(nnx.Module):
    """Attention from the latent tokens to the conditioning tokens, with a key-padding mask.

    The context keeps its own width: kv heads = context_dim / head_dim, fewer than the query heads for SAO (12 vs 24).
    That is grouped-query attention where query head i reads kv head i // (heads / kv_heads), the reference's
    repeat_interleave, which is also how `jax.nn.dot_product_attention` groups heads.

    `differential` (Stable Audio 3 medium): to_q gives [embed, 2, heads, head_dim] (q, q₂) and to_kv
    [context, 3, kv_heads, head_dim] (k, k₂, v), the reference's chunk orders; out = attn(q, k, v) − attn(q₂, k₂, v).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, *, rngs: nnx.Rngs, zero_init_out: bool = True,
                 use_mask: bool = True, qk_norm: str = "none", differential: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        head_dim = dim // num_heads
        if context_dim % head_dim or num_heads % (context_dim // head_dim):
            raise ValueError(
                f"cross-attention context width {context_dim} must be a multiple of the head dim {head_dim} giving a "
                f"divisor of num_heads {num_heads}"
            )
        kv_heads = context_dim // head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.use_mask = use_mask
        self.differential = differential
        self.q_norm, self.k_norm = qk_norms(qk_norm, head_dim, dtype, param_dtype)
        # Without differential attention the kernels keep their original shapes (converted checkpoints load as before).
        q_pairs = (2,) if differential else ()
        self.to_q = Linear((dim,), (*q_pairs, num_heads, head_dim), ("embed", *(None,) * len(q_pairs), "heads", "kv"),
                           use_bias=False, **kw)
        # The context width is fsdp-sharded like the latent width ("embed"): these kernels are 2.7% of SAO.
        self.to_kv = Linear((context_dim,), (3 if differential else 2, kv_heads, head_dim),
                            ("embed", None, "heads", "kv"), use_bias=False, **kw)
        self.to_out = Linear((num_heads, head_dim), (dim,), ("heads", "kv", "embed"), use_bias=False,
                             zero_init=zero_init_out, **kw)

    def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None) -> jax.Array:
        queries = self.to_q(x)
        kv = self.to_kv(context)
        if self.differential:
            pairs = [(queries[:, :, 0], kv[:, :, 0]), (queries[:, :, 1], kv[:, :, 1])]
            v = kv[:, :, 2]
        else:
            pairs, v = [(queries, kv[:, :, 0])], kv[:, :, 1]
        masked = self.use_mask and context_mask is not None
        mask = context_mask.astype(bool)[:, None, None, :] if masked else None
        out = None
        for q, k in pairs:
            q = _normalised(self.q_norm, constrain(q, ACTIVATION_HEADS))
            part = attention(q, _normalised(self.k_norm, k), v, mask=mask)
            out = part if out is None else out - part
        if masked:
            # A sample with no valid token (the CFG null condition) gets no cross-attention contribution, as the
            # reference's all-zero null context does; softmax over only-masked keys would otherwise average them.
            has_context = jnp.any(context_mask.astype(bool), axis=-1)[:, None, None, None]
            out = jnp.where(has_context, out, jnp.zeros_like(out))
        return self.to_out(constrain(out, ACTIVATION_HEADS))

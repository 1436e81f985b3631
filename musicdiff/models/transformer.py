"""The DiT's ContinuousTransformer: project in, prepend the global token, blocks, project out (spec §2.3-2.4).

Two block types (`model.block_type`):
- "sao": the reference block, h += SelfAttn(LN(h)); h += CrossAttn(LN(h), ctx); h += FF(LN(h)), with zero-initialised
  branch outputs, and the conditioning vector (timestep + global embedding) prepended as one extra token.
- "adaln_zero": the DiT paper's block (Peebles & Xie): a zero-initialised Linear(SiLU(c)) gives per-block
  (shift, scale, gate) for self-attention and FF, LN(h)·(1 + scale) + shift feeds the branch and gate multiplies its
  output, so every block starts as the identity. The conditioning enters only through the modulation (no prepended
  token); cross-attention is kept and not modulated. Chunk order as the DiT paper: shift, scale, gate for
  attention, then for the MLP. (The reference's own adaLN path differs: sigmoid(1 - gate) and a learned per-block
  offset.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from musicdiff.models.attention import CrossAttention, LayerNorm, Linear, SelfAttention, rotary_angles
from musicdiff.models.remat import checkpointed
from musicdiff.parallel.sharding import constrain

if TYPE_CHECKING:
    from musicdiff.models.dit import DiTConfig

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_MLP = ("activation_batch", "activation_length", "activation_mlp")
BLOCK_TYPES = ("sao", "adaln_zero")

# "dots" keeps the outputs of the weight matmuls (no batch dimension in the dot) and recomputes attention scores and
# elementwise ops: most of the memory saving of "full" at a fraction of its recompute.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class FeedForward(nnx.Module):
    """SwiGLU: proj (with bias) to [value a | gate b] of width mult·dim each, then out(a · SiLU(b))."""

    def __init__(self, dim: int, mult: int, *, rngs: nnx.Rngs, zero_init_out: bool, dtype, param_dtype):
        inner = dim * mult
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = Linear((dim,), (2, inner), ("embed", None, "mlp"), use_bias=True, **kw)
        self.out = Linear((inner,), (dim,), ("mlp", "embed"), use_bias=True, zero_init=zero_init_out, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj(x)
        hidden = constrain(h[..., 0, :] * jax.nn.silu(h[..., 1, :]), ACTIVATION_MLP)
        return self.out(hidden)


class TransformerBlock(nnx.Module):
    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        dim, dtype, param_dtype = config.embed_dim, config.compute_dtype, config.weight_dtype
        adaln = config.block_type == "adaln_zero"
        norm = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # adaLN-Zero gates the branches, so their output layers keep the ordinary init (as the DiT paper);
        # the SAO block relies on zero-initialised outputs instead.
        self.pre_norm = LayerNorm(dim, use_scale=not adaln, **norm)
        self.self_attn = SelfAttention(dim, config.num_heads, zero_init_out=not adaln,
                                       implementation=config.attention_impl, qk_norm=config.qk_norm, **kw)
        if config.cond_token_dim:
            self.cross_attend_norm = LayerNorm(dim, **norm)
            self.cross_attn = CrossAttention(dim, config.context_dim, config.num_heads, zero_init_out=True,
                                             use_mask=config.use_cross_attn_mask, qk_norm=config.qk_norm, **kw)
        else:
            self.cross_attend_norm = self.cross_attn = None
        self.ff_norm = LayerNorm(dim, use_scale=not adaln, **norm)
        self.ff = FeedForward(dim, config.ff_mult, zero_init_out=not adaln, **kw)
        self.modulation = (Linear((dim,), (6, dim), ("embed", None, "mlp"), use_bias=True, zero_init=True, **kw)
                           if adaln else None)

    def __call__(self, h: jax.Array, cond: jax.Array, context: jax.Array | None, context_mask: jax.Array | None,
                 cos: jax.Array, sin: jax.Array) -> jax.Array:
        if self.modulation is not None:
            mod = self.modulation(jax.nn.silu(cond))[:, :, None, :]  # [B, 6, 1, dim]
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (mod[:, i] for i in range(6))
            h = h + gate_sa * self.self_attn(self.pre_norm(h) * (1 + scale_sa) + shift_sa, cos, sin)
        else:
            h = h + self.self_attn(self.pre_norm(h), cos, sin)
        if self.cross_attn is not None and context is not None:
            h = self._add_cross_attention(h, context, context_mask)
        if self.modulation is not None:
            h = h + gate_ff * self.ff(self.ff_norm(h) * (1 + scale_ff) + shift_ff)
        else:
            h = h + self.ff(self.ff_norm(h))
        return constrain(h, ACTIVATION)

    def _add_cross_attention(self, h: jax.Array, context: jax.Array, context_mask: jax.Array | None) -> jax.Array:
        rows = context.shape[0]
        if rows == h.shape[0]:
            return h + self.cross_attn(self.cross_attend_norm(h), context, context_mask)
        # Rows past the context's have the null context (DiT.__call__): their branch is exactly zero, so it is skipped.
        return h.at[:rows].add(self.cross_attn(self.cross_attend_norm(h[:rows]), context, context_mask))


def _run_block(block: TransformerBlock, h, cond, context, context_mask, cos, sin):
    return block(h, cond, context, context_mask, cos, sin)


class ContinuousTransformer(nnx.Module):
    """[B, L, io] latents -> [B, L, io]; the conditioning token is prepended at rotary position 0 ("sao")."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.prepend_length = config.prepend_length
        self.rotary_dim = config.rotary_dim
        self.rotary_base = config.rotary_base
        self.remat = config.remat
        self.project_in = Linear((config.io_channels,), (config.embed_dim,), (None, "embed"), use_bias=False, **kw)
        self.layers = nnx.List([TransformerBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.project_out = Linear((config.embed_dim,), (config.io_channels,), ("embed", None), use_bias=False, **kw)

    def __call__(self, x: jax.Array, cond: jax.Array, context: jax.Array | None,
                 context_mask: jax.Array | None) -> jax.Array:
        h = self.project_in(x)
        if self.prepend_length:
            h = jnp.concatenate([cond[:, None, :].astype(h.dtype), h], axis=1)
        h = constrain(h, ACTIVATION)
        cos, sin = rotary_angles(h.shape[1], self.rotary_dim, self.rotary_base)
        for block in self.layers:
            if self.remat == "none":
                h = _run_block(block, h, cond, context, context_mask, cos, sin)
            else:
                h = checkpointed(_run_block, block, h, cond, context, context_mask, cos, sin,
                                 policy=REMAT_POLICIES[self.remat])
        # project_out runs before the prepended token is dropped, as in the reference.
        return self.project_out(h)[:, self.prepend_length:]

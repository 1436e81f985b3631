"""The continuous transformer of the denoisers: project in, prepend the conditioning token, blocks, project out
(spec §2.3-2.4). Configured by its own `TransformerConfig`; a denoiser (models/dit.py) derives one.

Three block types (`block_type`):
- "sao": the reference block, h += SelfAttn(LN(h)); h += CrossAttn(LN(h), ctx); h += FF(LN(h)), with zero-initialised
  branch outputs, and the conditioning vector (timestep + global embedding) prepended as one extra token.
- "adaln_zero": the DiT paper's block (Peebles & Xie): a zero-initialised Linear(SiLU(c)) gives per-block
  (shift, scale, gate) for self-attention and FF, LN(h)·(1 + scale) + shift feeds the branch and gate multiplies its
  output, so every block starts as the identity. The conditioning enters only through the modulation (no prepended
  token); cross-attention is kept and not modulated. Chunk order as the DiT paper: shift, scale, gate for
  attention, then for the MLP. (The reference's own adaLN path differs: sigmoid(1 - gate) and a learned per-block
  offset; that is "sa3_adaln".)
- "sa3_adaln": Stable Audio 3's adaLN (spec §3.2 steps 7-8). The transformer's one `global_cond_embedder`
  (Linear(E -> E, bias) -> SiLU -> Linear(E -> 6E, bias)) maps the conditioning vector to G [B, 6, E]; each block
  adds its learned `to_scale_shift_gate` [6, E] (init N(0, 1/E)) and splits (scale, shift, gate) for self-attention
  and FF in that order: h += sigmoid(1 - gate) · branch(norm(h)·(1 + scale) + shift). Cross-attention is plain
  (no modulation, no gate); branch outputs are zero-initialised as the reference, so a fresh block is the identity.

Stable Audio 3's other options: `norm_type="rms_norm"` (RMSNorm with a scale for the pre/cross/ff norms),
`qk_norm="rms"`, `differential_attention` (models/attention.py) and `num_memory_tokens` M > 0: M learned tokens
[M, E] (init N(0, 1)) prepended after project_in (before the conditioning token, if any, as the reference), taking
rotary positions 0..M-1, always keys under a padding mask, zero local conditioning, dropped before the output.

Two extension points, neither of which touches the blocks' parameters (so checkpoint key mappings stay as they are):
- `block_residuals`: a sequence of [B, N, E] arrays (N = the sequence the blocks see, prepended token included);
  entry i is added to the hidden state after block i. Fewer entries than blocks leave the later blocks alone (a
  ControlNet copies the first blocks).
- per-block adapters: with `adapter` set, `adapters/<i>` holds one module per block built by the block-adapter
  registry (models/block_adapters.py); after block i's cross-attention, h += adapter_i(h, **adapter_inputs).
With `local_cond_dim` > 0 each block also has `to_local_embed` (models/local_conditioning.py): after cross-attention
(and the adapter), h += to_local_embed(local_cond), the prepended token getting zero (SA3's local_add_cond).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.errors import ConfigError
from musicdiff.models import block_adapters
from musicdiff.models.attention import (NORM_TYPES, QK_NORMS, ConditionMLP, CrossAttention, Linear, SelfAttention,
                                       make_norm, rotary_angles, rotary_dim, rotary_inv_freq)
from musicdiff.models.local_conditioning import LocalEmbed
from musicdiff.models.remat import checkpointed
from musicdiff.parallel.sharding import constrain

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_MLP = ("activation_batch", "activation_length", "activation_mlp")
BLOCK_TYPES = ("sao", "adaln_zero", "sa3_adaln")
ATTENTION_IMPLEMENTATIONS = {"auto": None, "xla": "xla", "cudnn": "cudnn"}

# "dots" keeps the outputs of the weight matmuls (no batch dimension in the dot) and recomputes attention scores and
# elementwise ops: most of the memory saving of "full" at a fraction of its recompute.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DtypeFields:
    """compute_dtype / weight_dtype of a model config whose `dtype` and `param_dtype` are dtype names."""

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(DtypeFields):
    io_channels: int  # width of what is projected in (and out, unless out_channels says otherwise)
    embed_dim: int
    depth: int
    num_heads: int
    context_dim: int = 0  # cross-attention context width; 0: no cross-attention
    prepend_cond: bool = True  # the conditioning vector as an extra first token ("sao" blocks)
    block_type: str = "sao"
    ff_mult: int = 4
    rotary_min_dim: int = 32
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_cross_attn_mask: bool = True
    qk_norm: str = "none"
    attention_implementation: str = "auto"
    out_channels: int = 0  # width projected out; 0: io_channels (a denoiser with input-concatenated features)
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter: tuple[tuple[str, Any], ...] = ()  # (("name", registered adapter), (option, value), ...); () = none
    sinusoidal_embedding: bool = False  # absolute positions, as the reference's use_sinusoidal_emb (SAO: off)
    local_cond_dim: int = 0  # width of a local_cond token (models/local_conditioning.py); 0: none
    norm_type: str = "layer_norm"  # "layer_norm" (SAO) | "rms_norm" (Stable Audio 3)
    differential_attention: bool = False  # self- and cross-attention (Stable Audio 3 medium)
    num_memory_tokens: int = 0  # learned tokens prepended to the sequence (Stable Audio 3: 64)
    prefix: str = "config.model"  # where the options live in the user's config, for error messages

    def __post_init__(self):
        checks = (("block_type", BLOCK_TYPES), ("qk_norm", QK_NORMS), ("remat", ("none", *REMAT_POLICIES)),
                  ("norm_type", NORM_TYPES),
                  ("attention_implementation", tuple(ATTENTION_IMPLEMENTATIONS)))
        for key, allowed in checks:
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{self.prefix}.{key}='{getattr(self, key)}': expected one of {', '.join(allowed)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{self.prefix}.embed_dim={self.embed_dim}: must be divisible by num_heads "
                              f"{self.num_heads}")
        for key in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, key))
            except TypeError:
                raise ConfigError(f"{self.prefix}.{key}='{getattr(self, key)}': not a dtype; use e.g. "
                                  f"bfloat16") from None
        if self.norm_type == "rms_norm" and self.block_type == "adaln_zero":
            raise ConfigError(f"{self.prefix}.norm_type='rms_norm': adaln_zero blocks need the scale-free layer_norm")
        if self.num_memory_tokens < 0:
            raise ConfigError(f"{self.prefix}.num_memory_tokens={self.num_memory_tokens}: must be 0 (none) or more")
        if self.adapter and "name" not in dict(self.adapter):
            raise ConfigError(f"{self.prefix}.adapter: needs a 'name' (one of {', '.join(block_adapters.names())})")

    @property
    def prepend_length(self) -> int:
        """Tokens in front of the sequence: the memory tokens, then the conditioning token ("sao")."""
        return self.num_memory_tokens + (1 if self.prepend_cond else 0)

    @property
    def attention_impl(self) -> str | None:
        return ATTENTION_IMPLEMENTATIONS[self.attention_implementation]


def adapter_options(section: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """A config's `adapter` section ({"name": ..., options}) as the hashable form the configs store."""
    if not section:
        return ()
    items = dict(section)
    if not items.get("name"):
        return ()
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items.items()))


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
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        dim, dtype, param_dtype = config.embed_dim, config.compute_dtype, config.weight_dtype
        adaln = config.block_type == "adaln_zero"
        norm = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn = dict(qk_norm=config.qk_norm, differential=config.differential_attention, **kw)
        # adaLN-Zero gates the branches, so their output layers keep the ordinary init (as the DiT paper);
        # the SAO and SA3 blocks rely on zero-initialised outputs instead.
        self.pre_norm = make_norm(config.norm_type, dim, use_scale=not adaln, **norm)
        self.self_attn = SelfAttention(dim, config.num_heads, zero_init_out=not adaln,
                                       implementation=config.attention_impl, **attn)
        if config.context_dim:
            self.cross_attend_norm = make_norm(config.norm_type, dim, **norm)
            self.cross_attn = CrossAttention(dim, config.context_dim, config.num_heads, zero_init_out=True,
                                             use_mask=config.use_cross_attn_mask, **attn)
        else:
            self.cross_attend_norm = self.cross_attn = None
        self.ff_norm = make_norm(config.norm_type, dim, use_scale=not adaln, **norm)
        self.ff = FeedForward(dim, config.ff_mult, zero_init_out=not adaln, **kw)
        self.modulation = (Linear((dim,), (6, dim), ("embed", None, "mlp"), use_bias=True, zero_init=True, **kw)
                           if adaln else None)
        if config.block_type == "sa3_adaln":  # absent otherwise, so the parameter tree stays as it was
            offset = jax.random.normal(rngs.params(), (6, dim), param_dtype) / np.sqrt(dim).astype(param_dtype)
            self.to_scale_shift_gate = nnx.Param(offset, out_sharding=(None, "norm"))
        if config.local_cond_dim:  # absent otherwise, so the parameter tree stays as it was
            self.to_local_embed = LocalEmbed(config.local_cond_dim, dim, **kw)
            self.prepend_length = config.prepend_length

    def __call__(self, h: jax.Array, cond: jax.Array, context: jax.Array | None, context_mask: jax.Array | None,
                 cos: jax.Array, sin: jax.Array, adapter: nnx.Module | None = None,
                 adapter_inputs: Mapping[str, Any] | None = None, local: jax.Array | None = None,
                 key_mask: jax.Array | None = None) -> jax.Array:
        modulate_sa, modulate_ff = self._modulations(cond)
        h = h + _modulated(modulate_sa, lambda x: self.self_attn(x, cos, sin, key_mask), self.pre_norm(h))
        if self.cross_attn is not None and context is not None:
            h = self._add_cross_attention(h, context, context_mask)
        if adapter is not None:
            h = h + adapter(h, **dict(adapter_inputs or {}))
        if local is not None:
            h = h + self.to_local_embed(local, self.prepend_length).astype(h.dtype)
        h = h + _modulated(modulate_ff, self.ff, self.ff_norm(h))
        return constrain(h, ACTIVATION)

    def _modulations(self, cond: jax.Array) -> tuple[tuple | None, tuple | None]:
        """(scale, shift, gate) [B, 1, dim] each for self-attention and for FF, or (None, None) without adaLN."""
        if self.modulation is not None:  # adaLN-Zero, the DiT paper's order: shift, scale, gate
            mod = self.modulation(jax.nn.silu(cond))[:, :, None, :]  # [B, 6, 1, dim]
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (mod[:, i] for i in range(6))
            return (scale_sa, shift_sa, gate_sa), (scale_ff, shift_ff, gate_ff)
        if hasattr(self, "to_scale_shift_gate"):  # SA3: cond is global_cond_embedder's [B, 6, dim]; sigmoid(1 - g)
            mod = (self.to_scale_shift_gate[...].astype(cond.dtype) + cond)[:, :, None, :]
            scale_sa, shift_sa, gate_sa, scale_ff, shift_ff, gate_ff = (mod[:, i] for i in range(6))
            return ((scale_sa, shift_sa, jax.nn.sigmoid(1 - gate_sa)),
                    (scale_ff, shift_ff, jax.nn.sigmoid(1 - gate_ff)))
        return None, None

    def _add_cross_attention(self, h: jax.Array, context: jax.Array, context_mask: jax.Array | None) -> jax.Array:
        rows = context.shape[0]
        if rows == h.shape[0]:
            return h + self.cross_attn(self.cross_attend_norm(h), context, context_mask)
        # Rows past the context's have the null context (DiT.__call__): their branch is exactly zero, so it is skipped.
        return h.at[:rows].add(self.cross_attn(self.cross_attend_norm(h[:rows]), context, context_mask))


def _modulated(modulation: tuple | None, branch, normed: jax.Array) -> jax.Array:
    """branch(normed), or with adaLN gate · branch(normed · (1 + scale) + shift)."""
    if modulation is None:
        return branch(normed)
    scale, shift, gate = modulation
    return gate * branch(normed * (1 + scale) + shift)


def _run_block(modules: tuple[TransformerBlock, nnx.Module | None], h, cond, context, context_mask, cos, sin,
               adapter_inputs, key_mask=None, local=None):
    block, adapter = modules
    return block(h, cond, context, context_mask, cos, sin, adapter, adapter_inputs, local, key_mask)


class ScaledSinusoidalEmbedding(nnx.Module):
    """Absolute positions n -> scale · [sin(n·f_j), cos(n·f_j)], f_j = 10000^(-j/(dim/2)), with one learned `scale`
    (init dim^-0.5): the reference's ScaledSinusoidalEmbedding. Rotary attention sees only offsets between tokens;
    this tells each token where it is in the window (e.g. how far from a clip's first beat)."""

    def __init__(self, dim: int, *, param_dtype: Any = jnp.float32):
        if dim % 2:
            raise ConfigError(f"sinusoidal_embedding: embed_dim={dim} must be even")
        self.scale = nnx.Param(jnp.full((1,), dim**-0.5, param_dtype), out_sharding=(None,))
        self.dim = dim

    def __call__(self, length: int) -> jax.Array:
        # The rotary embedding's frequencies: 10000^(-2j/dim) = 10000^(-j/(dim/2)).
        angles = np.arange(length, dtype=np.float64)[:, None] * rotary_inv_freq(self.dim)[None, :]
        table = jnp.asarray(np.concatenate([np.sin(angles), np.cos(angles)], axis=-1), jnp.float32)
        return table * self.scale[...].astype(jnp.float32)


class ContinuousTransformer(nnx.Module):
    """[B, L, io] -> [B, L, io]; the conditioning token is prepended at rotary position 0 (`prepend_cond`).

    `token_mask` [B, L] (True = a real token) keeps padded tokens out of self-attention's keys; the prepended token
    is always a key. Queries are not masked: padded rows get outputs computed from the real keys only."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.prepend_length = config.prepend_length
        self.prepend_cond = config.prepend_cond
        self.rotary_dim = rotary_dim(config.embed_dim // config.num_heads, config.rotary_min_dim)
        self.rotary_base = config.rotary_base
        self.remat = config.remat
        self.project_in = Linear((config.io_channels,), (config.embed_dim,), (None, "embed"), use_bias=False, **kw)
        # Absent unless used, so the parameter trees of the other configurations stay as they were.
        if config.num_memory_tokens:
            tokens = jax.random.normal(rngs.params(), (config.num_memory_tokens, config.embed_dim), config.weight_dtype)
            self.memory_tokens = nnx.Param(tokens, out_sharding=(None, "embed"))
        if config.block_type == "sa3_adaln":
            self.global_cond_embedder = ConditionMLP(config.embed_dim, config.embed_dim, "embed", use_bias=True,
                                                     out_shape=(6, config.embed_dim), **kw)
        self.layers = nnx.List([TransformerBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.project_out = Linear((config.embed_dim,), (config.out_channels or config.io_channels,), ("embed", None),
                                  use_bias=False, **kw)
        self.pos_emb = (ScaledSinusoidalEmbedding(config.embed_dim, param_dtype=config.weight_dtype)
                        if config.sinusoidal_embedding else None)
        # Adapters sit beside `layers`, not inside the blocks, so the blocks' parameter paths never change.
        self.adapters = (nnx.List([block_adapters.build(config, index, rngs) for index in range(config.depth)])
                         if config.adapter else None)

    def __call__(self, x: jax.Array, cond: jax.Array, context: jax.Array | None, context_mask: jax.Array | None, *,
                 block_residuals: Sequence[jax.Array] | None = None,
                 adapter_inputs: Mapping[str, Any] | None = None, local_cond: jax.Array | None = None,
                 token_mask: jax.Array | None = None) -> jax.Array:
        """`local_cond`: [B, L, local_cond_dim] tokens for the blocks' to_local_embed (None: no local branch)."""
        h = self.project_in(x)
        key_mask = None
        if token_mask is not None:
            key_mask = jnp.concatenate([jnp.ones((x.shape[0], self.prepend_length), bool), token_mask.astype(bool)],
                                       axis=1)
        if self.prepend_cond:
            h = jnp.concatenate([cond[:, None, :].astype(h.dtype), h], axis=1)
        if hasattr(self, "memory_tokens"):  # in front of everything, as the reference
            memory = jnp.broadcast_to(self.memory_tokens[...].astype(h.dtype), (h.shape[0], *self.memory_tokens.shape))
            h = jnp.concatenate([memory, h], axis=1)
        if hasattr(self, "global_cond_embedder"):  # SA3 adaLN: once here, each block adds its own offset
            cond = self.global_cond_embedder(cond)
        if self.pos_emb is not None:  # after the prepended tokens, which take the first positions, as the reference
            h = h + self.pos_emb(h.shape[1])[None].astype(h.dtype)
        h = constrain(h, ACTIVATION)
        cos, sin = rotary_angles(h.shape[1], self.rotary_dim, self.rotary_base)
        residuals = list(block_residuals or ())
        if len(residuals) > len(self.layers):
            raise ValueError(f"block_residuals: {len(residuals)} entries for {len(self.layers)} blocks")
        if adapter_inputs and self.adapters is None:
            raise ValueError("adapter_inputs were given but the model has no adapters (config.model.adapter)")
        for index, block in enumerate(self.layers):
            modules = (block, None if self.adapters is None else self.adapters[index])
            args = (h, cond, context, context_mask, cos, sin, adapter_inputs, key_mask)
            if local_cond is not None:
                args = (*args, local_cond)
            if self.remat == "none":
                h = _run_block(modules, *args)
            else:
                h = checkpointed(_run_block, modules, *args, policy=REMAT_POLICIES[self.remat])
            if index < len(residuals):
                h = h + residuals[index].astype(h.dtype)
        # project_out acts per token: dropping the prepended tokens before or after it (the reference: memory tokens
        # before, the conditioning token after) gives the same numbers.
        return self.project_out(h)[:, self.prepend_length:]

"""The Stable Audio Open diffusion transformer (spec §2), registered as model "dit"; a denoiser
(models/denoiser.py):

    model(x [B, C, L], t [B] in [0, 1], cond: ConditioningInputs(cross_tokens [B, T, cond_token_dim],
          cross_mask [B, T] bool, global_embed [B, global_cond_dim] or None,
          input_concat [B, input_concat_dim, L] or None) | None,
          block_residuals=None, adapter_inputs=None, local_cond=None, padding_mask=None) -> [B, C, L]

With input_concat_dim > 0 (0 in SAO) the features are appended to the latent channels before patching, as the
reference's input concatenation: preprocess_conv and project_in take (C + input_concat_dim)·patch_size channels,
project_out and postprocess_conv give C·patch_size.

With local_cond_dim D > 0 (0 in SAO) the model declares LOCAL_CONDITIONING and takes `local_cond` [B, D, L] (None:
zeros, text-to-audio): each block adds to_local_embed(local) after cross-attention (Stable Audio 3's inpainting
input, spec §3.2 step 8; models/local_conditioning.py), patched like the latents.

Forward (spec §2.3): ctx = to_cond_embed(cross_tokens); cond = to_timestep_embed(fourier(t)) + to_global_embed(g);
x += preprocess_conv(x); transformer (cond prepended as one token for "sao" blocks, or modulating "adaln_zero"
blocks); out += postprocess_conv(out). Classifier-free guidance stays outside: samplers batch [cond; uncond] and
`drop_cross_conditioning` gives the training-time null condition (cross tokens dropped, global embedding kept).

cond.cross_tokens (and cross_mask) may have fewer rows than x: rows past them get the null context (all-zero tokens).
The context MLP and the cross-attention's kv and output projections have no bias, so zero tokens give zero values and
an exactly zero cross-attention branch, whatever the mask. Those rows skip cross-attention: the unconditional half
of a CFG batch costs one cross-attention less per block.

Variable length (spec §3.4, §4; capability PADDING_MASK): `padding_mask` [B, L] bool (True = a real latent frame)
zeroes the padded frames' inputs (latents and input_concat features) before patching, marks a token real when any of
its patch_size frames is, and keeps padded tokens out of self-attention's keys (real key masking, as the reference's
GPU varlen path; the prepended conditioning token is always a key). Cross-attention, FF and the convs act per token,
so outputs at real frames do not depend on what the padded frames held. Without a mask the computation is the
unmasked one, unchanged.

Parameter tree and the SAO checkpoint keys it maps to (prefix `model.model.`, spec §9.2; kernels are the transposed
PyTorch weights, split heads reshaped head-major):
    timestep_features.weight [128]                  timestep_features.weight [128, 1]
    to_{timestep,cond,global}_embed.in_proj/out_proj   to_*_embed.0 / to_*_embed.2 (.weight, .bias)
    preprocess_conv.kernel, postprocess_conv.kernel  *_conv.weight [C, C, 1]
    transformer.project_in / project_out.kernel      transformer.project_in / project_out.weight
    transformer.layers.N.{pre_norm,cross_attend_norm,ff_norm}.scale     ....gamma (beta: zero buffer, dropped)
    transformer.layers.N.self_attn.to_qkv.kernel [E, 3, H, D]           ....self_attn.to_qkv.weight [3E, E]
    transformer.layers.N.{self_attn,cross_attn}.to_out.kernel [H, D, E] ....to_out.weight [E, E]
    transformer.layers.N.cross_attn.to_q.kernel [E, H, D]; to_kv.kernel [Dc, 2, Dc/D, D]
    transformer.layers.N.ff.proj.kernel [E, 2, 4E] / .bias [2, 4E]      ....ff.ff.0.proj.weight / .bias
    transformer.layers.N.ff.out.kernel [4E, E] / .bias                  ....ff.ff.2.weight / .bias
    transformer.layers.N.{self_attn,cross_attn}.{q_norm,k_norm}.scale / .bias   (qk_norm="ln") ....weight / .bias
    transformer.layers.N.to_local_embed.{in_proj,out_proj}.{kernel,bias}  (local_cond_dim > 0; SA3's
        transformer.layers.N.to_local_embed.{0,2}.{weight,bias}; absent from SAO)
Stable Audio 3 (spec §3; `block_type="sa3_adaln"`, `norm_type="rms_norm"`, `qk_norm="rms"`,
`differential_attention`, `num_memory_tokens`, `timestep_features_type="expo"`; models/transformer.py) adds
    transformer.memory_tokens [M, E]; transformer.global_cond_embedder.{in,out}_proj; per block to_scale_shift_gate
    [6, E], RMSNorm scales (norms and q/k norms, SA3's `gamma`), differential to_qkv [E, 5, H, D] and cross to_q
    [E, 2, H, D] / to_kv [Dc, 3, Dc/D, D]; its ExpoFourier timestep features have no parameter. Key map:
    convert/sa3_dit_keys.py.
`patch_size` p > 1 (not in SAO; p = 1 is the reference) makes each token p consecutive latent frames: [B, C, L] is
read as [B, L/p, p·C] around the convs and the transformer (their widths become p·C), so the sequence is p times
shorter for the same audio. The rotary inv_freq buffer is recomputed (`attention.rotary_inv_freq`), not stored. Adapters (`model.adapter`) live
under transformer.adapters.N, outside these keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicdiff.errors import ConfigError, refuse_unknown_options
from musicdiff.models.attention import ConditionMLP, Linear, rotary_dim
from musicdiff.models.denoiser import (BLOCK_ADAPTERS, BLOCK_RESIDUALS, IMPLICIT_NULL_CONTEXT, LOCAL_CONDITIONING,
                                       PADDING_MASK, ConditioningInputs)
from musicdiff.models.local_conditioning import local_tokens
from musicdiff.models.number_embedding import expo_fourier_features
from musicdiff.models.registry import register
from musicdiff.models.transformer import ContinuousTransformer, DtypeFields, TransformerConfig, adapter_options
from musicdiff.parallel.sharding import split_count


@dataclasses.dataclass(frozen=True)
class DiTConfig(DtypeFields):
    io_channels: int = 64
    embed_dim: int = 1536
    depth: int = 24
    num_heads: int = 24
    cond_token_dim: int = 768
    global_cond_dim: int = 1536
    project_cond_tokens: bool = False  # False: the context keeps cond_token_dim width (SAO); True: embed_dim
    block_type: str = "sao"  # "sao" | "adaln_zero" | "sa3_adaln" (models/transformer.py)
    timestep_features_dim: int = 256
    timestep_features_type: str = "learned"  # "learned" (SAO: N(0, 1) frequencies) | "expo" (SA3: fixed)
    timestep_features_logsnr: bool = False  # features of (5 - clip(log((1-t)/t), -12, 5))/17 instead of t
    ff_mult: int = 4
    rotary_min_dim: int = 32
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_cross_attn_mask: bool = True  # the reference ignores the mask; False reproduces it exactly
    qk_norm: str = "none"  # "none" | "ln": LayerNorm of q and k over the head dim (reference attn_kwargs.qk_norm)
    attention_implementation: str = "auto"  # "auto" | "xla" | "cudnn" (self-attention)
    remat: str = "none"  # "none" | "full" | "dots"
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"
    adapter: tuple[tuple[str, Any], ...] = ()  # per-block adapters (models/block_adapters.py); () = none
    patch_size: int = 1  # latent frames per token (1 = SAO)
    sinusoidal_embedding: bool = False  # absolute token positions beside rotary (reference use_sinusoidal_emb)
    input_concat_dim: int = 0  # channels of cond.input_concat appended to the latents' (reference input_concat_dim)
    local_cond_dim: int = 0  # channels of local_cond added in every block (SA3's local_add_cond_dim); 0: none
    norm_type: str = "layer_norm"  # "layer_norm" (SAO) | "rms_norm" (SA3), the blocks' pre/cross/ff norms
    differential_attention: bool = False  # differential self- and cross-attention (SA3 medium)
    num_memory_tokens: int = 0  # learned tokens in front of the sequence (SA3: 64)

    def __post_init__(self):
        if self.input_concat_dim < 0:
            raise ConfigError(f"config.model.input_concat_dim={self.input_concat_dim}: must be 0 or more")
        if self.local_cond_dim < 0:
            raise ConfigError(f"config.model.local_cond_dim={self.local_cond_dim}: must be 0 (off) or more")
        if self.timestep_features_type not in TIMESTEP_FEATURES:
            raise ConfigError(f"config.model.timestep_features_type={self.timestep_features_type!r}: expected one of "
                              f"{', '.join(TIMESTEP_FEATURES)}")
        if self.patch_size < 1:
            raise ConfigError(f"config.model.patch_size={self.patch_size}: use 1 (one latent frame per token) or more")
        _ = self.transformer  # building it validates the transformer options

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict | dict) -> DiTConfig:
        values = dict(model_config)
        values.pop("name", None)
        values.pop("transformer_type", None)  # the one transformer there is; older configs name it
        values["adapter"] = adapter_options(values.get("adapter"))
        refuse_unknown_options(values, (f.name for f in dataclasses.fields(cls)), "config.model", "a DiT")
        return cls(**values)

    @property
    def token_channels(self) -> int:
        """Width of one output token: patch_size frames of io_channels."""
        return self.io_channels * self.patch_size

    @property
    def input_token_channels(self) -> int:
        """Width of one token before project_in: patch_size frames of io_channels + input_concat_dim."""
        return (self.io_channels + self.input_concat_dim) * self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def context_dim(self) -> int:
        if not self.cond_token_dim:
            return 0
        return self.embed_dim if self.project_cond_tokens else self.cond_token_dim

    @property
    def prepend_length(self) -> int:
        return self.transformer.prepend_length

    @property
    def rotary_dim(self) -> int:
        return rotary_dim(self.head_dim, self.rotary_min_dim)

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            io_channels=self.input_token_channels, out_channels=self.token_channels, embed_dim=self.embed_dim,
            depth=self.depth, num_heads=self.num_heads, context_dim=self.context_dim,
            prepend_cond=self.block_type == "sao", block_type=self.block_type,
            ff_mult=self.ff_mult, rotary_min_dim=self.rotary_min_dim, rotary_base=self.rotary_base,
            layer_norm_eps=self.layer_norm_eps, use_cross_attn_mask=self.use_cross_attn_mask, qk_norm=self.qk_norm,
            attention_implementation=self.attention_implementation, remat=self.remat, dtype=self.dtype,
            param_dtype=self.param_dtype, adapter=self.adapter, sinusoidal_embedding=self.sinusoidal_embedding,
            local_cond_dim=self.local_cond_dim * self.patch_size, norm_type=self.norm_type,
            differential_attention=self.differential_attention, num_memory_tokens=self.num_memory_tokens)


TIMESTEP_FEATURES = ("learned", "expo")


class FourierFeatures(nnx.Module):
    """t [B] -> [cos 2πtw, sin 2πtw] [B, dim] with learned frequencies w ~ N(0, 1) (cos first, as the reference)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        if dim % 2:
            raise ConfigError(f"config.model.timestep_features_dim={dim}: must be even")
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (dim // 2,), param_dtype), out_sharding=(None,))

    def __call__(self, t: jax.Array) -> jax.Array:
        f = 2 * math.pi * t.astype(jnp.float32)[:, None] * self.weight[...].astype(jnp.float32)[None, :]
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


class ExpoFourierFeatures(nnx.Module):
    """t [B] -> [cos 2πtf, sin 2πtf] [B, dim] in fp32, f log-spaced over [0.5, 1e4] (SA3; no parameters)."""

    def __init__(self, dim: int):
        if dim % 2:
            raise ConfigError(f"config.model.timestep_features_dim={dim}: must be even")
        self.dim = dim

    def __call__(self, t: jax.Array) -> jax.Array:
        return expo_fourier_features(t, self.dim)


def logsnr_time(t: jax.Array) -> jax.Array:
    """The reference's `timestep_features_logsnr` input: log-SNR log((1-t)/t) clipped to [-12, 5], mapped to [0, 1]
    with t = 0 -> 0 and t = 1 -> 1 (fp32, t clipped to [1e-7, 1 - 1e-7])."""
    t = jnp.clip(t.astype(jnp.float32), 1e-7, 1 - 1e-7)
    return (5.0 - jnp.clip(jnp.log((1 - t) / t), -12.0, 5.0)) / 17.0


class DiT(nnx.Module):
    capabilities = frozenset({IMPLICIT_NULL_CONTEXT, BLOCK_RESIDUALS, BLOCK_ADAPTERS, PADDING_MASK})

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        E, C, C_in = config.embed_dim, config.token_channels, config.input_token_channels
        kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.timestep_features = (ExpoFourierFeatures(config.timestep_features_dim)
                                  if config.timestep_features_type == "expo" else
                                  FourierFeatures(config.timestep_features_dim, rngs=rngs,
                                                  param_dtype=config.weight_dtype))
        self.to_timestep_embed = ConditionMLP(config.timestep_features_dim, E, None, use_bias=True, **kw)
        self.to_cond_embed = (ConditionMLP(config.cond_token_dim, config.context_dim, "cond_embed", use_bias=False,
                                           **kw) if config.cond_token_dim else None)
        self.to_global_embed = (ConditionMLP(config.global_cond_dim, E, "cond_embed", use_bias=False, **kw)
                                if config.global_cond_dim else None)
        # 1x1 convs over channels, zero-initialised and used residually, so they start as the identity.
        self.preprocess_conv = Linear((C_in,), (C_in,), ("conv_in", "conv_out"), use_bias=False, zero_init=True, **kw)
        self.postprocess_conv = Linear((C,), (C,), ("conv_in", "conv_out"), use_bias=False, zero_init=True, **kw)
        self.transformer = ContinuousTransformer(config.transformer, rngs=rngs)
        if config.local_cond_dim:
            self.capabilities = DiT.capabilities | {LOCAL_CONDITIONING}

    def __call__(self, x: jax.Array, t: jax.Array, cond: ConditioningInputs | None = None, *,
                 block_residuals: Any = None, adapter_inputs: Any = None, local_cond: Any = None,
                 padding_mask: jax.Array | None = None) -> jax.Array:
        config = self.config
        if x.ndim != 3 or x.shape[1] != config.io_channels:
            raise ValueError(f"DiT expects latents [batch, {config.io_channels}, length], got {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],))
        embedding = self.to_timestep_embed(self.timestep_features(logsnr_time(t) if config.timestep_features_logsnr
                                                                  else t))
        context = cross_mask = None
        if cond is not None and cond.global_embed is not None:
            if self.to_global_embed is None:
                raise ValueError("cond.global_embed was given but config.model.global_cond_dim is 0")
            embedding = embedding + self.to_global_embed(cond.global_embed)
        if cond is not None and cond.cross_tokens is not None and self.to_cond_embed is not None:
            cross_tokens, cross_mask = _rows_for_null_context(cond.cross_tokens, cond.cross_mask, x.shape[0])
            context = self.to_cond_embed(cross_tokens)
        batch, channels, length = x.shape
        p = config.patch_size
        if length % p:
            raise ValueError(f"DiT: {length} latent frames are not a multiple of config.model.patch_size={p}")
        h = jnp.swapaxes(self._with_input_concat(x, cond), 1, 2)  # [B, L, C_in]
        token_mask = None
        if padding_mask is not None:
            if padding_mask.shape != (batch, length):
                raise ValueError(f"DiT: padding_mask has shape {padding_mask.shape}; expected [{batch}, {length}]")
            frame_mask = padding_mask.astype(bool)
            # Zeroed, the padded frames' content cannot reach a token that also holds real frames (patch_size > 1).
            h = jnp.where(frame_mask[:, :, None], h, jnp.zeros_like(h))
            token_mask = jnp.any(frame_mask.reshape(batch, length // p, p), axis=-1)
        h = h.reshape(batch, length // p, p * h.shape[-1])  # [B, L/p, p·C_in], frame-major
        h = h + self.preprocess_conv(h)
        local = None
        if config.local_cond_dim:
            if padding_mask is not None and local_cond is not None:  # padded frames carry no local input either
                local_cond = jnp.where(padding_mask.astype(bool)[:, None, :], local_cond, jnp.zeros_like(local_cond))
            local = local_tokens(local_cond, config.local_cond_dim, batch, length, p, h.dtype)
        elif local_cond is not None:
            raise ValueError("local_cond was given but config.model.local_cond_dim is 0 (no local conditioning input)")
        out = self.transformer(h, embedding, context, cross_mask, block_residuals=block_residuals,
                               adapter_inputs=adapter_inputs, local_cond=local, token_mask=token_mask)
        out = out + self.postprocess_conv(out)
        return jnp.swapaxes(out.reshape(batch, length, channels), 1, 2).astype(x.dtype)

    def _with_input_concat(self, x: jax.Array, cond: ConditioningInputs | None) -> jax.Array:
        """x with cond.input_concat appended to its channels; absent features are the hidden (all-zero) condition."""
        dim = self.config.input_concat_dim
        features = None if cond is None else cond.input_concat
        if not dim:
            if features is not None:
                raise ValueError("cond.input_concat was given but config.model.input_concat_dim is 0")
            return x
        if features is None:
            features = jnp.zeros((x.shape[0], dim, x.shape[2]), x.dtype)
        if features.shape != (x.shape[0], dim, x.shape[2]):
            raise ValueError(f"DiT: cond.input_concat has shape {features.shape}; expected [{x.shape[0]} (batch), "
                             f"{dim} (config.model.input_concat_dim), {x.shape[2]} latent frames]")
        return jnp.concatenate([x, features.astype(x.dtype)], axis=1)

    def forward_flops(self, batch: int, length: int, cond_tokens: int) -> int:
        return dit_forward_flops(self.config, batch, length, cond_tokens)


def _rows_for_null_context(cross_tokens: jax.Array, cross_mask: jax.Array | None,
                           batch: int) -> tuple[jax.Array, jax.Array | None]:
    """Checks the rows of a short context; pads it with the null context when the batch is split over devices (the
    skipped rows would leave the devices that hold them idle and reshard the first rows)."""
    rows = cross_tokens.shape[0]
    if rows > batch or (cross_mask is not None and cross_mask.shape[0] != rows):
        mask_rows = None if cross_mask is None else cross_mask.shape[0]
        raise ValueError(f"DiT: cross_tokens has {rows} rows and cross_mask {mask_rows} for a batch of {batch}; "
                         f"the context needs at most one row per sample and the mask one row per context row")
    if rows == batch or split_count("activation_batch") == 1:
        return cross_tokens, cross_mask
    pad = ((0, batch - rows),)
    cross_tokens = jnp.pad(cross_tokens, pad + ((0, 0),) * (cross_tokens.ndim - 1))
    return cross_tokens, None if cross_mask is None else jnp.pad(cross_mask, pad + ((0, 0),))


@register("dit")
def build_dit(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DiT:
    return DiT(DiTConfig.from_config(model_config), rngs=rngs)


def drop_cross_conditioning(key: jax.Array, cross_tokens: jax.Array, cross_mask: jax.Array,
                            prob: float) -> tuple[jax.Array, jax.Array]:
    """Training-time CFG dropout (spec §2.5): per sample with probability `prob`, zero every cross token and mask them
    all out, which is the null condition samplers use for the unconditional branch. The global embedding is kept."""
    keep = jax.random.bernoulli(key, 1.0 - prob, (cross_tokens.shape[0],))
    tokens = jnp.where(keep[:, None, None], cross_tokens, jnp.zeros_like(cross_tokens))
    return tokens, jnp.logical_and(cross_mask.astype(bool), keep[:, None])


def _as_dit_config(model_config: DiTConfig | ml_collections.ConfigDict | dict) -> DiTConfig:
    return model_config if isinstance(model_config, DiTConfig) else DiTConfig.from_config(model_config)


def dit_forward_flops(model_config: DiTConfig | ml_collections.ConfigDict | dict, batch: int, length: int,
                      cond_tokens: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass; softmax, norms and elementwise ops are not counted.

    `length` latent frames, `cond_tokens` cross-attention tokens. Attention counts both q·k and p·v over the full
    (bidirectional) sequence including the prepended token. Cross-attention k/v project the context at its own width
    (2·T·Dc·2Dc), which is half of jax_anchors §6.2's "4·L·768·d" term.
    """
    c = _as_dit_config(model_config)
    E, C, C_in, Dc, F = c.embed_dim, c.token_channels, c.input_token_channels, c.context_dim, c.ff_mult * c.embed_dim
    length = length // c.patch_size  # tokens
    N, T = length + c.prepend_length, cond_tokens
    outside = (
        2 * (c.timestep_features_dim * E + E * E)
        + (2 * (c.global_cond_dim * E + E * E) if c.global_cond_dim else 0)
        + (2 * T * (c.cond_token_dim * Dc + Dc * Dc) if c.cond_token_dim else 0)
        + 2 * length * (C_in * C_in + C * C)  # pre/post 1x1 convs
        + 2 * length * C_in * E + 2 * N * E * C  # project_in (before the prepend), project_out (after)
    )
    pairs = 2 if c.differential_attention else 1  # query/key pairs (differential: two attention maps)
    self_attn = 2 * N * E * (2 * pairs + 1) * E + 2 * N * E * E + 4 * pairs * N * N * E
    cross_attn = (2 * N * E * pairs * E + 2 * T * Dc * (pairs + 1) * Dc + 4 * pairs * N * T * E + 2 * N * E * E
                  if c.cond_token_dim else 0)
    ff = 2 * N * E * 2 * F + 2 * N * F * E
    modulation = 2 * E * 6 * E if c.block_type == "adaln_zero" else 0
    if c.block_type == "sa3_adaln":  # the shared global_cond_embedder, once per forward
        outside += 2 * (E * E + E * 6 * E)
    local = 2 * length * (c.local_cond_dim * c.patch_size * E + E * E) if c.local_cond_dim else 0  # to_local_embed
    return batch * (outside + c.depth * (self_attn + cross_attn + ff + modulation + local))


def dit_train_flops(model_config: DiTConfig | ml_collections.ConfigDict | dict, batch: int, length: int,
                    cond_tokens: int) -> int:
    """FLOPs of one training step for MFU: 3 x forward (the backward pass is two matmuls per forward matmul: the
    gradients with respect to activations and to weights). Remat recomputation is not counted (that would be HFU)."""
    return 3 * dit_forward_flops(model_config, batch, length, cond_tokens)

"""T5Gemma encoder in Flax NNX (Stable Audio 3's text encoder, spec §3.3: `google/t5gemma-b-b-ul2`), following Hugging
Face's `T5GemmaEncoder` (transformers/models/t5gemma/modeling_t5gemma.py).

Token embedding times sqrt(hidden_size), then per layer
    x = x + post_attention_norm(attention(pre_attention_norm(x)))
    x = x + post_ff_norm(GeGLU(pre_ff_norm(x)))
and a final norm. Gemma-2 specifics:
- RMSNorm multiplies by (1 + w) (w stored as the offset from 1), statistics in float32;
- attention: RoPE (split halves, positions 0..T-1 whatever the padding) on queries and keys, logits scaled by
  query_pre_attn_scalar^-1/2 (not head_dim^-1/2) and tanh soft-capped at attn_logit_softcapping (50) before the mask;
  grouped-query attention when num_key_value_heads < num_attention_heads; logits and softmax in float32 always (the
  spec's fp32 softmax island);
- the encoder is bidirectional; layers named "sliding_attention" in layer_types only see keys within
  |query - key| <= sliding_window (4096: no effect at SA3's 256 tokens, kept so other checkpoints load faithfully);
- the feed-forward is GeGLU with the tanh GELU: down(gelu(gate x) * up x).
The output is `(embeddings * mask, mask)`: padded positions zeroed, as the T5 encoder gives them, so precompute's
stored real tokens and a generation-time call agree; Stable Audio 3's learned padding embedding is the prompt
conditioner's (models/conditioning.py, `padding_mode="learned"`). This encoder is frozen: no dropout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from musicdiff.errors import ConfigError
from musicdiff.models.attention import apply_rotary, rotary_angles
from musicdiff.models.text_encoder.hf_checkpoint import (KeyMap, load_hf_encoder, read_hf_config,
                                                         resolve_checkpoint_dir)
from musicdiff.models.text_encoder.layers import (ACTIVATIONS, AttentionKernels, FeedForward, RMSNorm,
                                                  dot_product_attention, embed_tokens, normal, padding_bias)
from musicdiff.parallel.sharding import DEFAULT_SHARDING_RULES, Rules, constrain

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class T5GemmaEncoderConfig:
    """The fields of a T5Gemma encoder config that the network needs (defaults: google/t5gemma-b-b-ul2 as the spec
    describes it; a checkpoint's config.json is authoritative)."""

    # Sizes the spec states (12 layers, 768 wide, 12 heads, GeGLU 2048).
    vocab_size: int = 256000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    # Not stated by the spec: 64 = 768 / 12 per head, no key/value grouping, queries scaled by head_dim^-1/2.
    num_key_value_heads: int = 12
    head_dim: int = 64
    query_pre_attn_scalar: float = 64
    # Gemma-2's: tanh GELU, norm epsilon, attention soft-cap, RoPE base and the window of "sliding_attention" layers.
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    attn_logit_softcapping: float | None = 50.0
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "T5GemmaEncoderConfig":
        """From a T5Gemma config.json (its `encoder` sub-config is read when present, as a T5GemmaEncoderModel,
        T5GemmaModel or T5GemmaForConditionalGeneration directory has it), or from a config section; unknown keys are
        ignored and what this encoder cannot reproduce is refused by name."""
        values = dict(values.get("encoder") or values)
        rope = dict(values.get("rope_parameters") or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"T5Gemma rope_parameters.rope_type={rope['rope_type']!r}: only the default RoPE is "
                              f"implemented")
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope["rope_theta"])
        if values.get("attention_bias"):
            raise ConfigError("T5Gemma attention_bias=True: this encoder has bias-free projections, as the released "
                              "checkpoints do")
        names = {f.name for f in dataclasses.fields(cls)}
        picked = {k: values[k] for k in names if k in values}
        picked["layer_types"] = tuple(picked.get("layer_types") or ())
        config = cls(**picked)
        config.validate()
        return config

    def validate(self) -> None:
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"T5Gemma hidden_activation={self.hidden_activation!r}: expected one of "
                              f"{', '.join(ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"T5Gemma num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"T5Gemma head_dim={self.head_dim}: RoPE needs an even head dimension")
        if self.layer_types and (len(self.layer_types) != self.num_hidden_layers
                                 or set(self.layer_types) - set(LAYER_TYPES)):
            raise ConfigError(f"T5Gemma layer_types={list(self.layer_types)}: expected {self.num_hidden_layers} "
                              f"entries, each one of {', '.join(LAYER_TYPES)}")

    @property
    def d_model(self) -> int:
        """The output width, under the name the T5 config gives it (captions.encode_captions reads it)."""
        return self.hidden_size

    def layer_type(self, index: int) -> str:
        if self.layer_types:
            return self.layer_types[index]
        return "sliding_attention" if (index + 1) % 2 else "full_attention"


class T5GemmaAttention(AttentionKernels):
    """Bidirectional self-attention with RoPE, Gemma's query scaling and logit soft-capping, and grouped-query keys
    and values (query [hidden, heads, head_dim], key/value [hidden, kv_heads, head_dim])."""

    def __init__(self, config: T5GemmaEncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        d, h = config.hidden_size, config.num_attention_heads
        super().__init__(d, h, config.num_key_value_heads, config.head_dim, query_std=d**-0.5, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
        self.groups = h // config.num_key_value_heads
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        self.softcap = config.attn_logit_softcapping

    def __call__(self, x: jax.Array, bias: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B, T, hidden]; bias [B, 1, T or 1, T] float32 (padding and window); cos, sin [T, head_dim]."""
        q, k, v = self.project(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Query head i reads key/value head i // groups (Hugging Face's repeat_kv).
        k, v = jnp.repeat(k, self.groups, axis=2), jnp.repeat(v, self.groups, axis=2)
        return self.output(dot_product_attention(q, k, v, bias, dtype=self.dtype, scale=self.scale,
                                                 softcap=self.softcap))


class T5GemmaBlock(nnx.Module):
    """One encoder layer: norms before and after both the attention and the feed-forward (Gemma-2 sandwich)."""

    def __init__(self, config: T5GemmaEncoderConfig, layer_type: str, *, rngs: nnx.Rngs, dtype: Any,
                 param_dtype: Any):
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True, param_dtype=param_dtype)
        self.sliding = layer_type == "sliding_attention"
        self.pre_attention_norm = norm()
        self.attention = T5GemmaAttention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_norm = norm()
        self.pre_ff_norm = norm()
        # Gated with the activation on `wi`: Hugging Face's gate_proj loads into wi, up_proj into wi_gate.
        self.ff = FeedForward(config.hidden_size, config.intermediate_size, config.hidden_activation, True,
                              rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_ff_norm = norm()

    def __call__(self, x: jax.Array, bias: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.post_attention_norm(self.attention(self.pre_attention_norm(x), bias, cos, sin))
        return x + self.post_ff_norm(self.ff(self.pre_ff_norm(x)))


class T5GemmaEncoder(nnx.Module):
    """`(input_ids [B, T] int, attention_mask [B, T]) -> (embeddings [B, T, hidden] with pads zeroed, mask bool)`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (float32 unless asked). Norm statistics,
    RoPE, attention logits and softmax run in float32 whatever `dtype` is.
    """

    def __init__(self, config: T5GemmaEncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        config.validate()
        self.config = config
        self.dtype = jnp.dtype(dtype)
        # std hidden^-1/2: the sqrt(hidden) input scaling then gives unit-variance inputs (loaded weights replace it).
        self.embed_tokens = nnx.Param(
            normal(rngs, (config.vocab_size, config.hidden_size), config.hidden_size**-0.5, param_dtype),
            out_sharding=("vocab", "embed"))
        self.blocks = nnx.List([
            T5GemmaBlock(config, config.layer_type(i), rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
            for i in range(config.num_hidden_layers)
        ])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        mask = attention_mask.astype(bool)
        length = input_ids.shape[1]
        # Hugging Face rounds the normaliser to the hidden dtype first (bfloat16: sqrt(768) becomes 27.75).
        x = embed_tokens(self.embed_tokens, input_ids, self.dtype) * jnp.asarray(self.config.hidden_size**0.5,
                                                                                  self.dtype)
        cos, sin = rotary_angles(length, self.config.head_dim, self.config.rope_theta)
        full_bias = padding_bias(mask)
        sliding_bias = full_bias
        if self.config.sliding_window is not None and length > self.config.sliding_window:
            positions = np.arange(length)
            window = np.abs(positions[:, None] - positions[None, :]) <= self.config.sliding_window
            sliding_bias = padding_bias(mask, jnp.asarray(window))
        for block in self.blocks:
            x = block(x, sliding_bias if block.sliding else full_bias, cos, sin)
            x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = self.final_norm(x)
        return x * mask[..., None].astype(x.dtype), mask


def hf_t5gemma_key_map(config: T5GemmaEncoderConfig, prefix: str = "encoder.") -> KeyMap:
    """Hugging Face encoder key -> (path in the NNX state, transform of the torch-layout array). `prefix`:
    "encoder." (T5GemmaEncoderModel, T5GemmaModel) or "model.encoder." (T5GemmaForConditionalGeneration)."""
    d, h, g, k = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    heads_in = lambda n: (lambda w: w.T.reshape(d, n, k))  # Linear weight [n*k, d] -> kernel [d, n, k]
    same = lambda w: w
    transpose = lambda w: w.T
    keys = {f"{prefix}embed_tokens.weight": (("embed_tokens",), same),
            f"{prefix}norm.weight": (("final_norm", "scale"), same)}
    parts = {
        "self_attn.q_proj": (("attention", "query"), heads_in(h)),
        "self_attn.k_proj": (("attention", "key"), heads_in(g)),
        "self_attn.v_proj": (("attention", "value"), heads_in(g)),
        "self_attn.o_proj": (("attention", "out"), lambda w: w.T.reshape(h, k, d)),
        "mlp.gate_proj": (("ff", "wi"), transpose),
        "mlp.up_proj": (("ff", "wi_gate"), transpose),
        "mlp.down_proj": (("ff", "wo"), transpose),
        "pre_self_attn_layernorm": (("pre_attention_norm", "scale"), same),
        "post_self_attn_layernorm": (("post_attention_norm", "scale"), same),
        "pre_feedforward_layernorm": (("pre_ff_norm", "scale"), same),
        "post_feedforward_layernorm": (("post_ff_norm", "scale"), same),
    }
    for i in range(config.num_hidden_layers):
        for hf, (path, fn) in parts.items():
            keys[f"{prefix}layers.{i}.{hf}.weight"] = (("blocks", i, *path), fn)
    return keys


def _ignored_t5gemma_key(key: str) -> bool:
    # Full T5Gemma checkpoints carry a decoder (and an LM head when it is not tied); an encoder-only load drops them.
    return key.startswith(("decoder.", "model.decoder.", "lm_head."))


def _encoder_prefix(present: set[str]) -> str:
    return "model.encoder." if any(key.startswith("model.encoder.") for key in present) else "encoder."


def load_t5gemma_encoder(path_or_name: str | Path, *, mesh: Mesh | None = None,
                         rules: Rules = DEFAULT_SHARDING_RULES, dtype: Any = jnp.float32,
                         param_dtype: Any = jnp.float32) -> T5GemmaEncoder:
    """The encoder of a Hugging Face T5Gemma directory (or hub name): an encoder-only or a full encoder-decoder
    checkpoint, its tensors streamed from safetensors onto `mesh` (hf_checkpoint.load_hf_encoder)."""
    directory = resolve_checkpoint_dir(path_or_name)
    config = T5GemmaEncoderConfig.from_mapping(read_hf_config(directory))
    build = lambda: T5GemmaEncoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    return load_hf_encoder(directory, build, lambda present: hf_t5gemma_key_map(config, _encoder_prefix(present)),
                           _ignored_t5gemma_key, mesh=mesh, rules=rules)

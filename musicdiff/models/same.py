"""The SAME autoencoder of Stable Audio 3 (stable_audio_3.md §2), registered as model "same".

Public layout as the Oobleck autoencoder's: audio `[B, channels, samples]`, latents `[B, latent_dim, frames]`, and
`frames = ceil(samples / downsampling_ratio)` with downsampling_ratio = patch_size · stride (256 · 16 = 4096).

Encode: zero-pad to a multiple of patch_size, patch without parameters (`[B, C, P·h]` → `[B, P, C·h]`, feature
index c·h + j: all of channel 0's samples, then channel 1's), encoder TRB (same_layers.py), Linear D → latent_dim,
SoftNorm bottleneck. Decode: bottleneck decode (× running_std), Linear latent_dim → D, decoder TRB, un-patch,
optional tanh (`soft_clip`).

Lengths: SAME-S's chunked attention needs an even number of frames; the reference pads and returns the padded
frame (encode) or its audio (decode). Here `encode` and `decode` return exactly `frames` frames and
`frames · ratio` samples (the Oobleck contract the trainer, precompute and generation rely on): the extra frame is
computed as the reference computes it and then dropped, so the kept values equal the reference's.

SoftNorm bottleneck (reference `SoftNormBottleneck(auto_scale=True)`, spec §2.5): x ← (x · scaling_factor + bias)
/ running_std. In the training pass (`__call__`) running_std ← max(0.999 · running_std + 0.001 · std(x), 1e-4)
first (std over the whole batch, Bessel-corrected like torch's, without gradient), and info["softnorm_loss"] =
mean_{b,c}[μ_t² + σ_t² − log σ_t² − 1] + 0.4 · mean_{b,t}[μ_c² + σ_c² − log σ_c² − 1] on the normalised latents
(μ, σ² over time per channel, then over channels per frame; σ² Bessel-corrected and clipped at 1e-4). Not
implemented: the reference's `noise_regularize` and `noise_augment_dim` (off in the released models per the MLX
ports), stride overrides, prepend/cross conditioning, conformer, LayerScale, feat_scale, RMS norms instead of DyT.

Weights stay in the reference's weight-norm form (g, v) on the conv mappings, so training follows the
reference's parametrisation and checkpoints convert one tensor to one parameter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicdiff.errors import ConfigError, refuse_unknown_options
from musicdiff.models.attention import Linear
from musicdiff.models.autoencoder import pad_to_multiple
from musicdiff.models import chunking
from musicdiff.models.registry import register
from musicdiff.models.same_layers import RunningStatistic, TransformerResamplingBlock

ATTENTION_KINDS = ("chunked", "sliding_window")
RUNNING_STD_MOMENTUM = 0.999
RUNNING_STD_FLOOR = 1e-4
SOFTNORM_VAR_FLOOR = 1e-4
SOFTNORM_CHANNEL_WEIGHT = 0.4


@dataclasses.dataclass(frozen=True)
class SoftNormConfig:
    type: str = "softnorm"

    def __post_init__(self):
        if self.type != "softnorm":
            raise ConfigError(f"config.autoencoder.bottleneck.type='{self.type}': SAME has a 'softnorm' bottleneck")


@dataclasses.dataclass(frozen=True)
class SAMEConfig:
    sample_rate: int = 44100
    in_channels: int = 2  # audio channels in and out (the reference's io_channels)
    out_channels: int = 2
    patch_size: int = 256
    strides: tuple[int, ...] = (16,)  # one TRB per side
    width: int = 768  # channels · c_mults[0] of the reference
    latent_dim: int = 256
    encoder_depth: int = 6
    decoder_depth: int = 6
    head_dim: int = 64
    ff_mult: int = 3
    attention: str = "chunked"  # or "sliding_window"
    chunk_size: int = 32  # patch tokens per chunk ("chunked")
    chunk_midpoint_shift: bool = True
    sliding_window: int = 1  # latent sub-chunks seen on each side ("sliding_window")
    differential: bool = True
    variable_stride: bool = True  # one learned new token broadcast, instead of one per output position
    encoder_mapping_kernel: int = 1
    decoder_mapping_kernel: int = 3  # the reference's conv_mapping=True; 1 otherwise
    decoder_sinusoidal_blocks: int = 0  # decoder block i has a sin gate iff decoder_depth − i < this
    soft_clip: bool = False
    dtype: str = "float32"
    remat: bool = False
    bottleneck: SoftNormConfig = SoftNormConfig()

    def __post_init__(self):
        where = "config.autoencoder"
        if len(self.strides) != 1 or self.strides[0] < 1:
            raise ConfigError(f"{where}.strides={self.strides}: SAME has one resampling block per side; give one "
                              f"positive stride")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"{where}.attention='{self.attention}': expected one of {', '.join(ATTENTION_KINDS)}")
        if self.head_dim < 2 or self.width % self.head_dim:
            raise ConfigError(f"{where}.width={self.width}: must be a multiple of head_dim={self.head_dim}")
        if self.head_dim % 4:
            raise ConfigError(f"{where}.head_dim={self.head_dim}: rotary covers head_dim/2 dims in pairs; use a "
                              f"multiple of 4")
        for key in ("encoder_mapping_kernel", "decoder_mapping_kernel"):
            if getattr(self, key) not in (1, 3):
                raise ConfigError(f"{where}.{key}={getattr(self, key)}: the reference's mappings have kernel 1 or 3")
        if self.attention == "chunked":
            frames = self.chunk_size // self.stride
            if self.chunk_size < self.stride or self.chunk_size % self.stride:
                raise ConfigError(f"{where}.chunk_size={self.chunk_size}: must be a multiple of the stride "
                                  f"{self.stride}")
            if self.chunk_midpoint_shift and frames % 2:
                raise ConfigError(f"{where}.chunk_size={self.chunk_size}: the midpoint shift moves chunks by half a "
                                  f"chunk of whole latent frames, so chunk_size / stride must be even")
        elif self.sliding_window < 0:
            raise ConfigError(f"{where}.sliding_window={self.sliding_window}: must be >= 0")
        if min(self.encoder_depth, self.decoder_depth) < 1:
            raise ConfigError(f"{where}.encoder_depth / decoder_depth: each side needs at least one block")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ConfigError(f"{where}.dtype='{self.dtype}': not a dtype; use float32") from None

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict | dict) -> SAMEConfig:
        values = dict(model_config)
        values.pop("name", None)
        refuse_unknown_options(values, (f.name for f in dataclasses.fields(cls)), "config.autoencoder", "a same")
        bottleneck = values.pop("bottleneck", {})
        if not isinstance(bottleneck, SoftNormConfig):
            bottleneck = dict(bottleneck)
            extra = sorted(set(bottleneck) - {"type"})
            if extra:
                raise ConfigError(f"config.autoencoder.bottleneck.{extra[0]}: the softnorm bottleneck has no options "
                                  f"besides type")
            bottleneck = SoftNormConfig(**bottleneck)
        if "strides" in values:
            values["strides"] = tuple(values["strides"])
        return cls(bottleneck=bottleneck, **values)

    @property
    def stride(self) -> int:
        return self.strides[0]

    @property
    def downsampling_ratio(self) -> int:
        return self.patch_size * self.stride

    @property
    def patch_channels(self) -> int:
        return self.in_channels * self.patch_size


class SoftNormBottleneck(nnx.Module):
    """Per-channel affine map and a scalar running std (see the module docstring). NWC: features `[B, F, D]`."""

    def __init__(self, latent_dim: int):
        self.scaling_factor = nnx.Param(jnp.ones((latent_dim,), jnp.float32), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((latent_dim,), jnp.float32), out_sharding=("norm",))
        self.running_std = RunningStatistic(jnp.ones((1,), jnp.float32), out_sharding=(None,))

    def _affine(self, features: jax.Array) -> jax.Array:
        return features.astype(jnp.float32) * self.scaling_factor[...] + self.bias[...]

    def encode(self, features: jax.Array, rng: jax.Array | None = None,
               sample: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Inference: latents `[B, F, D]` with the stored running std (rng/sample unused: nothing is sampled)."""
        return self._affine(features) / jax.lax.stop_gradient(self.running_std[...]), {}

    def encode_training(self, features: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training: updates running_std from this batch, then normalises and returns {"softnorm_loss"}."""
        x = self._affine(features)
        batch_std = jnp.std(jax.lax.stop_gradient(x), ddof=1)
        running = jnp.maximum(RUNNING_STD_MOMENTUM * jax.lax.stop_gradient(self.running_std[...])
                              + (1.0 - RUNNING_STD_MOMENTUM) * batch_std, RUNNING_STD_FLOOR)
        self.running_std[...] = running
        x = x / running
        return x, {"softnorm_loss": softnorm_loss(x), "running_std": running[0]}

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents * jax.lax.stop_gradient(self.running_std[...])


def softnorm_loss(x: jax.Array) -> jax.Array:
    """The reference's regulariser on normalised latents `[B, F(time), D(channels)]` (module docstring)."""

    def term(axis):
        var = jnp.maximum(jnp.var(x, axis=axis, ddof=1), SOFTNORM_VAR_FLOOR)
        mean = jnp.mean(x, axis=axis)
        return jnp.mean(jnp.square(mean) + var - jnp.log(var) - 1.0)

    return term(1) + SOFTNORM_CHANNEL_WEIGHT * term(2)


def patch(audio: jax.Array, patch_size: int) -> jax.Array:
    """`[B, C, P·h]` (P·h a multiple of h) → `[B, P, C·h]`, feature c·h + j = sample j of channel c."""
    batch, channels, samples = audio.shape
    patches = audio.reshape(batch, channels, samples // patch_size, patch_size)
    return patches.transpose(0, 2, 1, 3).reshape(batch, samples // patch_size, channels * patch_size)


def unpatch(patches: jax.Array, channels: int) -> jax.Array:
    """The inverse of `patch`: `[B, P, C·h]` → `[B, C, P·h]`."""
    batch, count, features = patches.shape
    h = features // channels
    return patches.reshape(batch, count, channels, h).transpose(0, 2, 1, 3).reshape(batch, channels, count * h)


class SAMEAutoencoder(nnx.Module):
    """Encoder, bottleneck and decoder with the reference's module paths: `encoder.layers.0` (TRB) and
    `encoder.layers.2` (Linear), `decoder.layers.1` (Linear) and `decoder.layers.3` (TRB), `bottleneck`."""

    def __init__(self, config: SAMEConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        shared = dict(stride=config.stride, head_dim=config.head_dim, ff_mult=config.ff_mult,
                      attention_kind=config.attention, chunk_size=config.chunk_size,
                      midpoint_shift=config.chunk_midpoint_shift, window=config.sliding_window,
                      differential=config.differential, variable_stride=config.variable_stride, remat=config.remat,
                      rngs=rngs, dtype=dtype)
        self.encoder = nnx.Module()
        self.encoder.layers = nnx.Dict({
            "0": TransformerResamplingBlock("encoder", config.patch_channels, config.width,
                                            depth=config.encoder_depth, mapping_kernel=config.encoder_mapping_kernel,
                                            sinusoidal_blocks=0, **shared),
            "2": Linear((config.width,), (config.latent_dim,), ("embed", "norm"), use_bias=True, rngs=rngs,
                        dtype=dtype),
        })
        self.decoder = nnx.Module()
        self.decoder.layers = nnx.Dict({
            "1": Linear((config.latent_dim,), (config.width,), ("norm", "embed"), use_bias=True, rngs=rngs,
                        dtype=dtype),
            "3": TransformerResamplingBlock("decoder", config.width, config.patch_channels,
                                            depth=config.decoder_depth, mapping_kernel=config.decoder_mapping_kernel,
                                            sinusoidal_blocks=config.decoder_sinusoidal_blocks, **shared),
        })
        self.bottleneck = SoftNormBottleneck(config.latent_dim)

    @property
    def downsampling_ratio(self) -> int:
        return self.config.downsampling_ratio

    def _check_audio(self, audio: jax.Array) -> None:
        if audio.ndim != 3 or audio.shape[1] != self.config.in_channels:
            raise ValueError(f"same expects audio [batch, {self.config.in_channels}, samples], got {audio.shape}")

    def encode_features(self, audio_nwc: jax.Array) -> jax.Array:
        """Pre-bottleneck latents `[B, F, latent_dim]` of NWC audio `[B, F · ratio, C]` (what chunked encoding
        stitches before the bottleneck)."""
        frames = audio_nwc.shape[1] // self.downsampling_ratio
        patches = patch(jnp.swapaxes(audio_nwc, 1, 2), self.config.patch_size)
        hidden = self.encoder.layers["0"](patches)[:, :frames]
        return self.encoder.layers["2"](hidden).astype(jnp.float32)

    def _audio_nwc(self, audio: jax.Array) -> jax.Array:
        self._check_audio(audio)
        return jnp.swapaxes(pad_to_multiple(audio, self.downsampling_ratio), 1, 2)

    def encode(self, audio: jax.Array, rng: jax.Array | None = None,
               sample: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """audio `[B, in_channels, T]` → (latents `[B, latent_dim, ceil(T / ratio)]`, {}) with the stored running
        std (deterministic; rng and sample are accepted for the autoencoder interface and unused)."""
        latents, info = self.bottleneck.encode(self.encode_features(self._audio_nwc(audio)))
        return jnp.swapaxes(latents, 1, 2), info

    def decode_nwc(self, latents_nwc: jax.Array) -> jax.Array:
        """`[B, F, latent_dim]` → `[B, F · ratio, out_channels]` in float32."""
        frames = latents_nwc.shape[1]
        hidden = self.decoder.layers["1"](self.bottleneck.decode(latents_nwc))
        patches = self.decoder.layers["3"](hidden)[:, :frames * self.config.stride]
        audio = unpatch(patches.astype(jnp.float32), self.config.out_channels)
        if self.config.soft_clip:
            audio = jnp.tanh(audio)
        return jnp.swapaxes(audio, 1, 2)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents `[B, latent_dim, F]` → audio `[B, out_channels, F · ratio]`."""
        if latents.ndim != 3 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"same decode expects latents [batch, {self.config.latent_dim}, frames], "
                             f"got {latents.shape}")
        return jnp.swapaxes(self.decode_nwc(jnp.swapaxes(latents, 1, 2)), 1, 2)

    def __call__(self, audio: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """Training pass: (reconstruction `[B, out_channels, T_padded]`, info with "softnorm_loss", "running_std"
        and "latents" `[B, latent_dim, F]`). Updates bottleneck.running_std in the module (the trainer keeps it)."""
        latents, info = self.bottleneck.encode_training(self.encode_features(self._audio_nwc(audio)))
        decoded = self.decode_nwc(latents)
        return jnp.swapaxes(decoded, 1, 2), {**info, "latents": jnp.swapaxes(latents, 1, 2)}


# ---- chunked encode / decode, trimmed as the reference's encode_audio / decode_audio -----------------------------

def reference_chunk_plan(total_frames: int, chunk_frames: int, overlap_frames: int) -> list[tuple[int, int, int]]:
    """Windows as (start, keep_from, keep_to) in latent frames, as `AudioAutoencoder.encode_audio/decode_audio`:
    starts every chunk − overlap frames, the last window anchored to the end; each window's inner edges lose
    overlap // 2 frames and a later window overwrites an earlier one where they still overlap (the anchored last
    window can overlap more). Shorter signals are one window (the reference then runs unchunked)."""
    if not 0 <= overlap_frames < chunk_frames:
        raise ValueError(f"need 0 <= overlap_frames < chunk_frames, got overlap {overlap_frames}, "
                         f"chunk {chunk_frames}")
    if total_frames <= chunk_frames:
        return [(0, 0, total_frames)]
    starts = list(range(0, total_frames - chunk_frames + 1, chunk_frames - overlap_frames))
    if starts[-1] != total_frames - chunk_frames:
        starts.append(total_frames - chunk_frames)
    half = overlap_frames // 2
    lows = [start + (half if i else 0) for i, start in enumerate(starts)]
    highs = [min(start + chunk_frames - half, nxt) for start, nxt in zip(starts[:-1], lows[1:])] + [total_frames]
    return list(zip(starts, lows, highs))


def chunked_encode(model: SAMEAutoencoder, audio: jax.Array, *, chunk_frames: int = 128,
                   overlap_frames: int = 32) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`model.encode` for long audio `[B, in_channels, T]` → (latents `[B, latent_dim, ceil(T / ratio)]`, {}),
    window by window as the reference (reference_chunk_plan)."""
    return chunking.chunked_encode(model, audio, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                   planner=reference_chunk_plan)


def chunked_decode(model: SAMEAutoencoder, latents: jax.Array, *, chunk_frames: int = 128,
                   overlap_frames: int = 32) -> jax.Array:
    """`model.decode` for long latents `[B, latent_dim, F]` → audio `[B, out_channels, F · ratio]`, window by window
    as the reference (reference_chunk_plan)."""
    return chunking.chunked_decode(model, latents, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                   planner=reference_chunk_plan)


@register("same")
def build_same(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SAMEAutoencoder:
    return SAMEAutoencoder(SAMEConfig.from_config(model_config), rngs=rngs)


__all__ = ["SAMEAutoencoder", "SAMEConfig", "SoftNormBottleneck", "chunked_decode", "chunked_encode", "patch",
           "reference_chunk_plan", "softnorm_loss", "unpatch"]

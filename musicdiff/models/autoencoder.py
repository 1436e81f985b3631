"""The Oobleck audio autoencoder (stable_audio_tools_spec.md §1), registered as model "oobleck".

Public layout is the reference's: audio `[B, channels, samples]`, latents `[B, latent_dim, frames]`; inside, every
tensor is NWC `[B, time, channels]`. `frames = ceil(samples / downsampling_ratio)`: `encode` zero-pads the audio at
the end to a multiple of the ratio, as the reference's `preprocess_audio_for_encoder` does.

Bottlenecks (`autoencoder.bottleneck.type`):
- "vae" (SAO): the encoder emits 2·latent_dim channels, split into mean (first half) and scale (second half);
  std = softplus(scale) + 1e-4, var = std², z = mean + std·ε. KL = mean over (batch, frames) of
  Σ_channels (mean² + var − log var − 1), with no ½ factor, exactly as the reference (spec §1.5, §10.2).
  Deviation: the reference always samples; here `encode(..., sample=False)` returns the mean (deterministic
  inference), `sample=True` reproduces the reference, and `__call__` (training) always samples.
- "vq" / "rvq": (residual) vector quantisation in a `codebook_dim` space (1×1 weight-normed projections in and out
  when it differs from latent_dim, as DAC). Codebooks learn from the loss, not by EMA, so a training step is a pure
  function of parameters: codebook_loss = Σ_stages mean (sg(r_i) − c_i)², commitment_loss = Σ_stages mean
  (r_i − sg(c_i))², quantizer_loss = codebook_weight·codebook_loss + commitment_weight·commitment_loss, where stage
  i quantises the residual r_i = z − Σ_{j<i} sg(c_j) (so every stage's commitment pulls on the encoder). The output
  is z + sg(Σ c_i − z): the straight-through gradient is the identity in codebook space. Usage per stage: perplexity
  exp(−Σ p log p) of the code histogram over the batch and the fraction of codes used.
- "none": identity.
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
from musicdiff.models.oobleck_layers import DECODER_UPSAMPLING, OobleckDecoder, OobleckEncoder, WNConv1d
from musicdiff.models.registry import register

BOTTLENECK_TYPES = ("vae", "vq", "rvq", "none")
VAE_STD_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    type: str = "vae"
    # vq / rvq only
    codebook_size: int = 1024
    num_quantizers: int = 1
    codebook_dim: int = 0  # 0: quantise in the latent space itself (no projections)
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0

    def __post_init__(self):
        if self.type not in BOTTLENECK_TYPES:
            raise ConfigError(f"config.autoencoder.bottleneck.type='{self.type}': expected one of "
                              f"{', '.join(BOTTLENECK_TYPES)}")
        if self.type == "vq" and self.num_quantizers != 1:
            raise ConfigError(f"config.autoencoder.bottleneck.num_quantizers={self.num_quantizers}: 'vq' has one "
                              f"codebook; use type='rvq' for several")
        if self.type in ("vq", "rvq") and (self.codebook_size < 2 or self.num_quantizers < 1):
            raise ConfigError("config.autoencoder.bottleneck: codebook_size must be >= 2 and num_quantizers >= 1")


@dataclasses.dataclass(frozen=True)
class OobleckConfig:
    sample_rate: int = 44100
    in_channels: int = 2
    out_channels: int = 2
    channels: int = 128
    c_mults: tuple[int, ...] = (1, 2, 4, 8, 16)
    strides: tuple[int, ...] = (2, 4, 4, 8, 8)
    latent_dim: int = 64
    use_snake: bool = True
    antialias: bool = False
    final_tanh: bool = False
    dtype: str = "float32"  # compute dtype; parameters and weight norms stay float32
    remat: bool = False  # recompute residual units in the backward pass, as the reference's training does
    decoder_upsample: str = "transpose"  # "transpose" (SAO) or "nearest" (repeat + conv): oobleck_layers.DecoderBlock
    bottleneck: BottleneckConfig = BottleneckConfig()

    def __post_init__(self):
        if len(self.c_mults) != len(self.strides):
            raise ConfigError(f"config.autoencoder.c_mults has {len(self.c_mults)} entries but strides has "
                              f"{len(self.strides)}; give one channel multiplier per stride")
        if self.antialias:
            raise ConfigError("config.autoencoder.antialias=True: anti-aliased activations are not implemented "
                              "(SAO does not use them); set it to False")
        if self.decoder_upsample not in DECODER_UPSAMPLING:
            raise ConfigError(f"config.autoencoder.decoder_upsample='{self.decoder_upsample}': expected one of "
                              f"{', '.join(DECODER_UPSAMPLING)}")
        if any(s < 1 for s in self.strides):
            raise ConfigError(f"config.autoencoder.strides={self.strides}: strides must be positive")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ConfigError(f"config.autoencoder.dtype='{self.dtype}': not a dtype; use float32") from None

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict | dict) -> OobleckConfig:
        values = dict(model_config)
        values.pop("name", None)
        refuse_unknown_options(values, (f.name for f in dataclasses.fields(cls)), "config.autoencoder", "an oobleck")
        bottleneck = values.pop("bottleneck", {})
        if not isinstance(bottleneck, BottleneckConfig):
            bottleneck = dict(bottleneck)
            known = {f.name for f in dataclasses.fields(BottleneckConfig)}
            extra = sorted(set(bottleneck) - known)
            if extra:
                raise ConfigError(f"config.autoencoder.bottleneck.{extra[0]}: not a bottleneck option; options are "
                                  f"{', '.join(sorted(known))}")
            bottleneck = BottleneckConfig(**bottleneck)
        for key in ("c_mults", "strides"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(bottleneck=bottleneck, **values)

    @property
    def downsampling_ratio(self) -> int:
        return math.prod(self.strides)

    @property
    def encoder_out_channels(self) -> int:
        return 2 * self.latent_dim if self.bottleneck.type == "vae" else self.latent_dim


class VAEBottleneck(nnx.Module):
    """Gaussian bottleneck of the reference (see the module docstring for the exact KL)."""

    @staticmethod
    def posterior(features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """features `[..., 2D]` → the Gaussian's (mean, std), each `[..., D]` float32 (what precompute stores)."""
        mean, scale = jnp.split(features.astype(jnp.float32), 2, axis=-1)
        return mean, jax.nn.softplus(scale) + VAE_STD_FLOOR

    def encode(self, features: jax.Array, rng: jax.Array | None = None,
               sample: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """features `[B, F, 2D]` (NWC) → latents `[B, F, D]` and {"kl": scalar}."""
        mean, std = self.posterior(features)
        var = jnp.square(std)
        kl = jnp.mean(jnp.sum(jnp.square(mean) + var - jnp.log(var) - 1.0, axis=-1))
        if not sample:
            return mean, {"kl": kl}
        if rng is None:
            raise ValueError("VAE sampling needs an rng key: encode(audio, rng=key, sample=True)")
        return mean + std * jax.random.normal(rng, mean.shape, mean.dtype), {"kl": kl}

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


class IdentityBottleneck(nnx.Module):
    def encode(self, features: jax.Array, rng: jax.Array | None = None,
               sample: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        return features, {}

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


class VectorQuantizer(nnx.Module):
    """One codebook `[codebook_size, dim]`; nearest code by Euclidean distance."""

    def __init__(self, codebook_size: int, dim: int, *, rngs: nnx.Rngs):
        codes = jax.random.normal(rngs.params(), (codebook_size, dim), jnp.float32)
        self.codebook = nnx.Param(codes, out_sharding=("codebook", "embed"))

    def nearest(self, vectors: jax.Array) -> jax.Array:
        """vectors `[..., dim]` → code indices `[...]` (int32)."""
        codebook = self.codebook[...]
        distances = (jnp.sum(jnp.square(vectors), -1, keepdims=True) - 2.0 * vectors @ codebook.T
                     + jnp.sum(jnp.square(codebook), -1))
        return jnp.argmin(distances, axis=-1).astype(jnp.int32)

    def lookup(self, codes: jax.Array) -> jax.Array:
        return jnp.take(self.codebook[...], codes, axis=0)


def code_usage(codes: jax.Array, codebook_size: int) -> tuple[jax.Array, jax.Array]:
    """(perplexity, fraction of codes used) of the code histogram over every position in `codes`."""
    counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
    probs = counts / codes.size
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


class ResidualVQBottleneck(nnx.Module):
    """(Residual) vector quantiser with loss-based codebooks and a straight-through estimator ("vq" = 1 stage)."""

    def __init__(self, latent_dim: int, config: BottleneckConfig, *, rngs: nnx.Rngs):
        dim = config.codebook_dim or latent_dim
        projected = dim != latent_dim
        self.project_in = WNConv1d(latent_dim, dim, 1, rngs=rngs) if projected else None
        self.project_out = WNConv1d(dim, latent_dim, 1, rngs=rngs) if projected else None
        self.quantizers = nnx.List([VectorQuantizer(config.codebook_size, dim, rngs=rngs)
                                    for _ in range(config.num_quantizers)])
        self.codebook_size = config.codebook_size
        self.commitment_weight, self.codebook_weight = config.commitment_weight, config.codebook_weight

    def quantize(self, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """z `[B, F, dim]` in codebook space → straight-through quantised z and the losses / usage / codes."""
        residual = z
        total = jnp.zeros_like(z)
        codebook_loss = commitment_loss = jnp.zeros((), jnp.float32)
        codes, perplexity, used = [], [], []
        for quantizer in self.quantizers:
            stage_codes = quantizer.nearest(jax.lax.stop_gradient(residual))
            code_vectors = quantizer.lookup(stage_codes)
            codebook_loss += jnp.mean(jnp.square(jax.lax.stop_gradient(residual) - code_vectors))
            commitment_loss += jnp.mean(jnp.square(residual - jax.lax.stop_gradient(code_vectors)))
            residual = residual - jax.lax.stop_gradient(code_vectors)
            total = total + code_vectors
            stage_perplexity, stage_used = code_usage(stage_codes, self.codebook_size)
            codes.append(stage_codes)
            perplexity.append(stage_perplexity)
            used.append(stage_used)
        quantized = z + jax.lax.stop_gradient(total - z)
        perplexity, used = jnp.stack(perplexity), jnp.stack(used)
        return quantized, {
            "quantizer_loss": self.codebook_weight * codebook_loss + self.commitment_weight * commitment_loss,
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "perplexity": jnp.mean(perplexity),
            "codes_used_fraction": jnp.mean(used),
            "perplexity_per_quantizer": perplexity,
            "codes_used_fraction_per_quantizer": used,
            "codes": jnp.stack(codes, axis=-1),  # [B, F, num_quantizers]
        }

    def encode(self, features: jax.Array, rng: jax.Array | None = None,
               sample: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """features `[B, F, latent_dim]` → quantised latents `[B, F, latent_dim]` and info (rng/sample unused)."""
        z = features.astype(jnp.float32)
        z = self.project_in(z) if self.project_in is not None else z
        quantized, info = self.quantize(z)
        return (self.project_out(quantized) if self.project_out is not None else quantized), info

    def codes_to_latents(self, codes: jax.Array) -> jax.Array:
        """codes `[B, F, num_quantizers]` → latents `[B, F, latent_dim]` (NWC), what `encode` returns for them."""
        z = sum(q.lookup(codes[..., i]) for i, q in enumerate(self.quantizers))
        return self.project_out(z) if self.project_out is not None else z

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


def build_bottleneck(config: OobleckConfig, rngs: nnx.Rngs) -> nnx.Module:
    kind = config.bottleneck.type
    if kind == "vae":
        return VAEBottleneck()
    if kind in ("vq", "rvq"):
        return ResidualVQBottleneck(config.latent_dim, config.bottleneck, rngs=rngs)
    return IdentityBottleneck()


def pad_to_multiple(audio: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads `[B, C, T]` audio at the end so T is a multiple of `multiple` (shapes are static under jit)."""
    extra = -audio.shape[-1] % multiple
    return jnp.pad(audio, ((0, 0), (0, 0), (0, extra))) if extra else audio


class OobleckAutoencoder(nnx.Module):
    """Encoder, bottleneck and decoder; parameters live under `encoder.layers…` and `decoder.layers…` like the
    reference's unwrapped checkpoint (spec §9.1, §9.4)."""

    def __init__(self, config: OobleckConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.encoder = OobleckEncoder(config.in_channels, config.channels, config.c_mults, config.strides,
                                      config.encoder_out_channels, use_snake=config.use_snake, rngs=rngs,
                                      dtype=dtype, remat=config.remat)
        self.decoder = OobleckDecoder(config.latent_dim, config.channels, config.c_mults, config.strides,
                                      config.out_channels, use_snake=config.use_snake, final_tanh=config.final_tanh,
                                      rngs=rngs, dtype=dtype, remat=config.remat,
                                      upsample=config.decoder_upsample)
        self.bottleneck = build_bottleneck(config, rngs)

    @property
    def downsampling_ratio(self) -> int:
        return self.config.downsampling_ratio

    def _check_audio(self, audio: jax.Array) -> None:
        if audio.ndim != 3 or audio.shape[1] != self.config.in_channels:
            raise ValueError(f"oobleck expects audio [batch, {self.config.in_channels}, samples], got {audio.shape}")

    def encode_features(self, audio_nwc: jax.Array) -> jax.Array:
        """Pre-bottleneck encoder output `[B, F, encoder_out_channels]` for NWC audio whose length is a multiple
        of the downsampling ratio (what chunked encoding stitches before the bottleneck)."""
        return self.encoder(audio_nwc).astype(jnp.float32)

    def encode(self, audio: jax.Array, rng: jax.Array | None = None,
               sample: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """audio `[B, in_channels, T]` → (latents `[B, latent_dim, ceil(T / ratio)]`, bottleneck info).

        info: VAE {"kl"}; VQ {"quantizer_loss", "codebook_loss", "commitment_loss", "perplexity",
        "codes_used_fraction", per-quantizer usage, "codes" [B, F, num_quantizers]}; none {}.
        """
        self._check_audio(audio)
        audio_nwc = jnp.swapaxes(pad_to_multiple(audio, self.downsampling_ratio), 1, 2)
        latents, info = self.bottleneck.encode(self.encode_features(audio_nwc), rng=rng, sample=sample)
        return jnp.swapaxes(latents, 1, 2), info

    def decode_nwc(self, latents_nwc: jax.Array) -> jax.Array:
        """`[B, F, latent_dim]` → `[B, F · ratio, out_channels]` in float32."""
        return self.decoder(self.bottleneck.decode(latents_nwc)).astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents `[B, latent_dim, F]` → audio `[B, out_channels, F · ratio]` (deterministic, unbounded)."""
        if latents.ndim != 3 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"oobleck decode expects latents [batch, {self.config.latent_dim}, frames], "
                             f"got {latents.shape}")
        return jnp.swapaxes(self.decode_nwc(jnp.swapaxes(latents, 1, 2)), 1, 2)

    def __call__(self, audio: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """Training pass: (reconstruction `[B, out_channels, T_padded]`, info with the bottleneck losses and
        "latents" `[B, latent_dim, F]`). The VAE samples, as the reference does in training, so `rng` is required
        there; spectral and adversarial losses belong to the training step."""
        if self.config.bottleneck.type == "vae" and rng is None:
            raise ValueError("the VAE training pass samples its latents: call model(audio, rng)")
        latents, info = self.encode(audio, rng=rng, sample=True)
        return self.decode(latents), {**info, "latents": latents}


@register("oobleck")
def build_oobleck(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> OobleckAutoencoder:
    return OobleckAutoencoder(OobleckConfig.from_config(model_config), rngs=rngs)

"""EnCodec-style multi-scale STFT discriminator and its hinge / feature-matching losses (spec §1.9).

Per scale: complex spectrogram (Hann, center=False, window-normalised), real and imaginary parts of every audio
channel stacked as conv channels [re_1..re_C, im_1..im_C]; a stack of weight-normed 2-D convs over (time, freq)
with LeakyReLU(0.2): (3,9) conv, three (3,9) convs dilated 1, 2, 4 along time, a 3x3 conv, then a 3x3 conv to one
logit channel. Strides are (1,1), as in stable-audio-tools (EnCodec used (1,2)). Feature maps are the outputs of
every activation. Layout is NHWC = [batch, frames, freq_bins, channels] throughout.

Losses, as stable-audio-tools' EncodecDiscriminator.loss: per scale, hinge D = mean relu(1 - D(real)) +
mean relu(1 + D(fake)), G_adv = -mean D(fake), feature matching = (sum over layers of mean |f_real - f_fake|)
/ number of layers; every term is then averaged over scales. `normalize=True` divides each layer's distance by
mean |f_real| + 1e-3 (the reference's `normalize_losses` option, off in the SAO recipe).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicdiff.audio.stft_losses import stft
from musicdiff.models.registry import register
from musicdiff.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    filters: int = 64
    audio_channels: int = 2
    n_ffts: tuple[int, ...] = (2048, 1024, 512, 256, 128)
    hop_lengths: tuple[int, ...] | None = None  # default n_fft // 4
    win_lengths: tuple[int, ...] | None = None  # default n_fft
    kernel_size: tuple[int, int] = (3, 9)
    dilations: tuple[int, ...] = (1, 2, 4)
    negative_slope: float = 0.2
    normalized: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    def scales(self) -> list[tuple[int, int, int]]:
        hops = self.hop_lengths or tuple(n // 4 for n in self.n_ffts)
        wins = self.win_lengths or tuple(self.n_ffts)
        if not len(self.n_ffts) == len(hops) == len(wins):
            raise ValueError(f"DiscriminatorConfig: {len(self.n_ffts)} n_ffts, {len(hops)} hops, {len(wins)} windows")
        return list(zip(self.n_ffts, hops, wins))


class WeightNormConv2d(nnx.Module):
    """Conv2d with weight normalisation (w = g · v / ||v|| per output channel), 'same' padding for odd kernels."""

    def __init__(self, in_features: int, out_features: int, kernel_size: tuple[int, int], *, rngs: nnx.Rngs,
                 dilation: tuple[int, int] = (1, 1), dtype: Any = jnp.float32):
        kh, kw = kernel_size
        fan_in = in_features * kh * kw
        bound = fan_in**-0.5  # PyTorch's default Conv2d init, which the reference keeps under weight_norm
        direction = jax.random.uniform(rngs.params(), (kh, kw, in_features, out_features), jnp.float32, -bound, bound)
        self.direction = nnx.Param(direction, out_sharding=("kernel", "kernel", "conv_in", "conv_out"))
        # weight_norm starts with g = ||v||, so the initial effective weight equals v.
        self.scale = nnx.Param(jnp.sqrt(jnp.sum(direction**2, axis=(0, 1, 2))), out_sharding=("conv_out",))
        self.bias = nnx.Param(
            jax.random.uniform(rngs.params(), (out_features,), jnp.float32, -bound, bound), out_sharding=("conv_out",)
        )
        self.dilation = dilation
        self.padding = tuple(((k - 1) * d // 2,) * 2 for k, d in zip(kernel_size, dilation))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        direction = self.direction[...]
        norm = jnp.sqrt(jnp.sum(direction**2, axis=(0, 1, 2)))
        kernel = (direction * (self.scale[...] / norm)).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel, window_strides=(1, 1), padding=self.padding, rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class STFTDiscriminator(nnx.Module):
    """One scale: audio [B, C, T] -> (logits [B, frames, bins, 1], feature maps)."""

    def __init__(self, n_fft: int, hop_length: int, win_length: int, config: DiscriminatorConfig, *,
                 rngs: nnx.Rngs):
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.normalized = config.normalized
        self.negative_slope = config.negative_slope
        filters, kernel = config.filters, tuple(config.kernel_size)
        square = (kernel[0], kernel[0])
        conv = lambda i, o, k, d=(1, 1): WeightNormConv2d(i, o, k, dilation=d, rngs=rngs, dtype=config.dtype)
        layers = [conv(2 * config.audio_channels, filters, kernel)]
        layers += [conv(filters, filters, kernel, (d, 1)) for d in config.dilations]
        layers.append(conv(filters, filters, square))
        self.convs = nnx.List(layers)
        self.conv_post = conv(filters, 1, square)

    def spectrogram(self, audio: jax.Array) -> jax.Array:
        """[B, C, T] -> [B, frames, bins, 2C] with channels [real parts..., imaginary parts...]."""
        spec = stft(audio.astype(jnp.float32), self.n_fft, self.hop_length, self.win_length, center=False,
                    normalized=self.normalized)
        z = jnp.concatenate([jnp.real(spec), jnp.imag(spec)], axis=1)  # [B, 2C, frames, bins]
        return jnp.transpose(z, (0, 2, 3, 1))

    def __call__(self, audio: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        z = constrain(self.spectrogram(audio), ("activation_batch", None, None, None))
        features = []
        for layer in self.convs:
            z = jax.nn.leaky_relu(layer(z), self.negative_slope)
            features.append(z)
        return self.conv_post(z).astype(jnp.float32), features


class MultiScaleSTFTDiscriminator(nnx.Module):
    """Several `STFTDiscriminator`s, one per STFT resolution."""

    def __init__(self, config: DiscriminatorConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.discriminators = nnx.List(
            [STFTDiscriminator(n, h, w, config, rngs=rngs) for n, h, w in config.scales()]
        )

    def __call__(self, audio: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        """audio [B, C, T] -> (logits per scale, feature maps per scale)."""
        if audio.ndim != 3 or audio.shape[1] != self.config.audio_channels:
            raise ValueError(
                f"discriminator expects [batch, {self.config.audio_channels}, samples] audio, got {audio.shape}"
            )
        logits, features = [], []
        for disc in self.discriminators:
            scale_logits, scale_features = disc(audio)
            logits.append(scale_logits)
            features.append(scale_features)
        return logits, features


def hinge_discriminator_loss(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Mean over scales of mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    per_scale = [jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f)) for r, f in zip(real_logits,
                                                                                              fake_logits)]
    return sum(per_scale) / len(per_scale)


def hinge_generator_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Mean over scales of -mean D(fake)."""
    return sum(-jnp.mean(f) for f in fake_logits) / len(fake_logits)


def feature_matching_loss(real_features: Sequence[Sequence[jax.Array]], fake_features: Sequence[Sequence[jax.Array]],
                          normalize: bool = False) -> jax.Array:
    """Mean over scales of (sum over layers of mean |real - fake|) / layers; see the module docstring."""
    per_scale = []
    for real_scale, fake_scale in zip(real_features, fake_features):
        distances = []
        for real, fake in zip(real_scale, fake_scale):
            distance = jnp.mean(jnp.abs(real.astype(jnp.float32) - fake.astype(jnp.float32)))
            if normalize:
                distance = distance / (jnp.mean(jnp.abs(real.astype(jnp.float32))) + 1e-3)
            distances.append(distance)
        per_scale.append(sum(distances) / len(distances))
    return sum(per_scale) / len(per_scale)


def adversarial_losses(discriminator: MultiScaleSTFTDiscriminator, reals: jax.Array, fakes: jax.Array,
                       normalize_feature_matching: bool = False) -> dict[str, jax.Array]:
    """Discriminator hinge, generator hinge and feature-matching losses from one pass over [reals; fakes].

    The trainer picks what to differentiate: the discriminator step uses `discriminator` with stop-gradient fakes,
    the generator step `adversarial` and `feature_matching` with the discriminator's parameters held fixed.
    """
    batch = reals.shape[0]
    logits, features = discriminator(jnp.concatenate([reals, fakes], axis=0))
    real_logits, fake_logits = [x[:batch] for x in logits], [x[batch:] for x in logits]
    real_features = [[f[:batch] for f in scale] for scale in features]
    fake_features = [[f[batch:] for f in scale] for scale in features]
    return dict(
        discriminator=hinge_discriminator_loss(real_logits, fake_logits),
        adversarial=hinge_generator_loss(fake_logits),
        feature_matching=feature_matching_loss(real_features, fake_features, normalize_feature_matching),
    )


def config_from(model_config: ml_collections.ConfigDict) -> DiscriminatorConfig:
    """A DiscriminatorConfig from a config section; keys not given keep the recipe's defaults."""
    fields = {f.name for f in dataclasses.fields(DiscriminatorConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_config.items() if k in fields}
    if "dtype" in values and isinstance(values["dtype"], str):
        values["dtype"] = jnp.dtype(values["dtype"])
    return DiscriminatorConfig(**values)


@register("encodec_discriminator")
def build(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MultiScaleSTFTDiscriminator:
    return MultiScaleSTFTDiscriminator(config_from(model_config), rngs=rngs)

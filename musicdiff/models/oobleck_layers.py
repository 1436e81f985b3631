"""Building blocks of the Oobleck autoencoder (stable_audio_tools_spec.md §1.2-§1.4), NWC layout throughout.

Module and parameter names mirror the PyTorch checkpoint so a converter maps keys one to one
(spec §9.4): `encoder.layers.{i}.layers.{j}.layers.{k}.{weight_g, weight_v, bias, alpha, beta}`. Layouts differ:
- Conv1d: torch weight_v `[out, in, k]` is stored here as `[k, in, out]` (lax "WIO"); weight_g `[out, 1, 1]` as `[out]`.
- ConvTranspose1d: torch weight_v `[in, out, k]` is stored as `[k, in, out]`; weight_g `[in, 1, 1]` as `[in]`
  (torch's weight_norm with dim=0 normalises a transposed-conv weight per INPUT channel).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from musicdiff.models.remat import checkpointed
from musicdiff.parallel.sharding import constrain

SNAKE_EPS = 1e-9  # the reference's 1 / (beta + 1e-9)
RESIDUAL_DILATIONS = (1, 3, 9)
ACTIVATION_AXES = ("activation_batch", None, None)  # [batch, time, channels]; time and channels stay whole


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float) -> jax.Array:
    # Drawn in power-of-two sized buckets: eager initialisation then compiles a few RNG programs, not one per shape.
    size = math.prod(shape)
    bucket = 1 << max(size - 1, 0).bit_length()
    return jax.random.uniform(rngs.params(), (bucket,), jnp.float32, -bound, bound)[:size].reshape(shape)


def _l2_norm(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis))


# π as three float32 parts (8 + 12 significant bits, then the rest): k · PI_HIGH and k · PI_MIDDLE are exact for
# |k| < 2^12 (Cody-Waite reduction).
PI_HIGH, PI_MIDDLE, PI_LOW = 3.140625, 9.677410125732422e-04, -8.742277657347586e-08
# sin(r) = r · Σ_n (−r²)^n / (2n + 1)! to r^13: below float32 resolution for |r| ≤ π/2.
SINE_SERIES = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(7))


def sin_squared(u: jax.Array) -> jax.Array:
    """sin²(u) by reduction modulo π (its period) and an odd polynomial: within 3e-7 of the exact value for
    |u| < 4000 (jnp.sin(u)² is within 9e-8), with the derivative sin(2u) by autodiff (round's gradient is zero).

    Why: XLA:CPU's sin is ~10x slower than a fused polynomial, and Snake was 28% of the demo autoencoder's training
    step on CPU; on GPUs both are cheap.
    """
    u = u.astype(jnp.float32)
    k = jnp.round(u * (1.0 / math.pi))
    r = ((u - k * PI_HIGH) - k * PI_MIDDLE) - k * PI_LOW
    r2 = r * r
    series = SINE_SERIES[-1]
    for coefficient in reversed(SINE_SERIES[:-1]):
        series = coefficient + r2 * series
    return jnp.square(r * series)


class Snake(nnx.Module):
    """SnakeBeta with log-scale parameters: y = x + 1 / (exp(beta) + 1e-9) · sin²(exp(alpha) · x), per channel
    (sin² by `sin_squared`)."""

    def __init__(self, channels: int, *, dtype: Any = jnp.float32):
        # exp(0) = 1: the reference starts from alpha = beta = 1.
        self.alpha = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",))
        self.beta = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("norm",))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        frequency = jnp.exp(self.alpha[...]).astype(self.dtype)
        inverse_magnitude = (1.0 / (jnp.exp(self.beta[...]) + SNAKE_EPS)).astype(self.dtype)
        return x + inverse_magnitude * sin_squared(frequency * x).astype(self.dtype)


class ELU(nnx.Module):
    """The `use_snake=False` activation; holds no parameters (keeps the layer indices of the Snake variant)."""

    def __init__(self, *, dtype: Any = jnp.float32):
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.elu(x.astype(self.dtype))


def activation(channels: int, use_snake: bool, dtype: Any) -> Snake | ELU:
    return Snake(channels, dtype=dtype) if use_snake else ELU(dtype=dtype)


class WNConv1d(nnx.Module):
    """Weight-normalised Conv1d: w = g · v / ||v||, the norm over (kernel, in) per output channel. `padding` is
    one count for both sides (default (k − 1)·d / 2) or a (left, right) pair.

    Initialised like PyTorch's Conv1d (uniform ±1/sqrt(in·k) for v and bias) with g = ||v||, as weight_norm does,
    so the initial effective weight equals v.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs, stride: int = 1,
                 dilation: int = 1, padding: int | tuple[int, int] | None = None, use_bias: bool = True,
                 dtype: Any = jnp.float32):
        bound = 1.0 / math.sqrt(in_channels * kernel_size)
        direction = _uniform(rngs, (kernel_size, in_channels, out_channels), bound)
        self.weight_v = nnx.Param(direction, out_sharding=("kernel", "conv_in", "conv_out"))
        self.weight_g = nnx.Param(_l2_norm(direction, (0, 1)), out_sharding=("conv_out",))
        self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound), out_sharding=("conv_out",)) if use_bias else None
        self.stride, self.dilation = stride, dilation
        padding = (kernel_size - 1) * dilation // 2 if padding is None else padding
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.dtype = dtype

    def kernel(self) -> jax.Array:
        """The effective weight g · v / ||v||, `[k, in, out]`, computed in float32 (bf16-safe norm)."""
        direction = self.weight_v[...].astype(jnp.float32)
        return direction * (self.weight_g[...].astype(jnp.float32) / _l2_norm(direction, (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel().astype(self.dtype), window_strides=(self.stride,),
            padding=(self.padding,), rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class WNConvTranspose1d(nnx.Module):
    """Weight-normalised ConvTranspose1d with PyTorch semantics (stride s, padding p, output_padding 0).

    y[n, o] = Σ_{l, j : n = l·s − p + j} x[l, i] · w[j, i, o]; output length (L − 1)·s − 2p + k. Computed phase by
    phase (see __call__), with no multiplications by inserted zeros.
    Weight norm is per input channel (torch dim=0 of `[in, out, k]`). PyTorch initialises a transposed conv from
    fan-in = out·k (its weight's dim 1), which is kept here.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, padding: int,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32):
        bound = 1.0 / math.sqrt(out_channels * kernel_size)
        direction = _uniform(rngs, (kernel_size, in_channels, out_channels), bound)
        self.weight_v = nnx.Param(direction, out_sharding=("kernel", "conv_in", "conv_out"))
        self.weight_g = nnx.Param(_l2_norm(direction, (0, 2)), out_sharding=("conv_in",))
        self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound), out_sharding=("conv_out",))
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dtype = dtype

    def kernel(self) -> jax.Array:
        """The effective weight g · v / ||v||, `[k, in, out]`, norm over (kernel, out) per input channel."""
        direction = self.weight_v[...].astype(jnp.float32)
        scale = self.weight_g[...].astype(jnp.float32) / _l2_norm(direction, (0, 2))
        return direction * scale[None, :, None]

    def output_length(self, length: int) -> int:
        return (length - 1) * self.stride - 2 * self.padding + self.kernel_size

    def __call__(self, x: jax.Array) -> jax.Array:
        # By output phase: y[q·s + r − p] = Σ_m x[q − m] · w[m·s + r], so each of the s phases is a stride-1
        # convolution of x with the taps w[r], w[s + r], ...: one convolution with s·out channels, then interleave.
        # Same sums as the reference's; the usual form (convolving the s-dilated input) multiplies zeros, and its
        # gradient ran 5-8x slower on XLA:CPU.
        batch, length, _ = x.shape
        s, k = self.stride, self.kernel_size
        taps = -(-k // s)
        kernel = self.kernel()
        _, channels_in, channels_out = kernel.shape
        kernel = jnp.pad(kernel, ((0, taps * s - k), (0, 0), (0, 0)))  # [taps·s, in, out]
        kernel = kernel.reshape(taps, s, channels_in, channels_out)[::-1]  # [m reversed, r, in, out]
        kernel = kernel.transpose(0, 2, 1, 3).reshape(taps, channels_in, s * channels_out)
        # Padded outside the convolution: with the padding inside it, XLA:CPU's gradient was ~5x slower.
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (taps - 1, taps - 1), (0, 0)))
        phases = jax.lax.conv_general_dilated(
            padded, kernel.astype(self.dtype), window_strides=(1,), padding=((0, 0),),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )  # [B, L + taps − 1, s·out]: row q holds outputs q·s .. q·s + s − 1 before cropping
        y = phases.reshape(batch, (length + taps - 1) * s, -1)
        y = y[:, self.padding:self.padding + self.output_length(length)]
        return y + self.bias[...].astype(self.dtype)


class NearestUpsample1d(nnx.Module):
    """Repeat every step `stride` times, then WNConv1d(kernel 2s, no bias, PyTorch padding='same': s − 1 left, s
    right): L → s·L. stable-audio-tools' `use_nearest_upsample` decoder layer.

    Why: a transposed conv gives each of the s output phases its own taps, so even a constant input comes out
    periodic at the input step rate (checkerboard, Odena et al. 2016): at the latent rate, a hum. Repeating first
    makes the whole layer a transposed conv whose kernel is w convolved with a length-s box, whose nulls at the
    input rate's harmonics cancel that pattern for any w: a constant input gives a constant output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.stride = stride
        self.conv = WNConv1d(in_channels, out_channels, 2 * stride, padding=(stride - 1, stride), use_bias=False,
                             rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(x, self.stride, axis=1))


DECODER_UPSAMPLING = ("transpose", "nearest")


def upsampling_layer(kind: str, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs,
                     dtype: Any) -> WNConvTranspose1d | NearestUpsample1d:
    """A decoder block's L → s·L layer: "transpose" (SAO's, whose checkpoints load) or "nearest"."""
    if kind == "transpose":
        return WNConvTranspose1d(in_channels, out_channels, 2 * stride, stride=stride,
                                 padding=math.ceil(stride / 2), rngs=rngs, dtype=dtype)
    if kind == "nearest":
        return NearestUpsample1d(in_channels, out_channels, stride, rngs=rngs, dtype=dtype)
    raise ValueError(f"decoder upsampling {kind!r}: expected one of {', '.join(DECODER_UPSAMPLING)}")


class ResidualUnit(nnx.Module):
    """y = x + Conv1x1(Act(Conv7_dilated(Act(x)))); `layers` = [Act, WNConv k7 dilation d, Act, WNConv k1]."""

    def __init__(self, channels: int, dilation: int, *, use_snake: bool, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 remat: bool = False):
        self.layers = nnx.List([
            activation(channels, use_snake, dtype),
            WNConv1d(channels, channels, 7, dilation=dilation, rngs=rngs, dtype=dtype),
            activation(channels, use_snake, dtype),
            WNConv1d(channels, channels, 1, rngs=rngs, dtype=dtype),
        ])
        self.remat = remat

    def residual(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        # The reference checkpoints this inner stack during training: recompute it in the backward pass.
        branch = checkpointed(ResidualUnit.residual, self, x) if self.remat else self.residual(x)
        return x.astype(branch.dtype) + branch


def _residual_units(channels: int, use_snake: bool, rngs: nnx.Rngs, dtype: Any, remat: bool) -> list[ResidualUnit]:
    return [ResidualUnit(channels, d, use_snake=use_snake, rngs=rngs, dtype=dtype, remat=remat)
            for d in RESIDUAL_DILATIONS]


class EncoderBlock(nnx.Module):
    """RU(d=1) → RU(3) → RU(9) → Act → WNConv1d(kernel 2s, stride s, padding ceil(s/2)): length L → L / s."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, use_snake: bool, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, remat: bool = False):
        self.layers = nnx.List(_residual_units(in_channels, use_snake, rngs, dtype, remat) + [
            activation(in_channels, use_snake, dtype),
            WNConv1d(in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2), rngs=rngs,
                     dtype=dtype),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderBlock(nnx.Module):
    """Act → upsampling → RU(1) → RU(3) → RU(9): L → s·L (even s for "transpose"). `upsample` "transpose" is
    WNConvTranspose1d(kernel 2s, stride s, padding ceil(s/2)); "nearest" is NearestUpsample1d."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, use_snake: bool, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, remat: bool = False, upsample: str = "transpose"):
        self.layers = nnx.List([
            activation(in_channels, use_snake, dtype),
            upsampling_layer(upsample, in_channels, out_channels, stride, rngs=rngs, dtype=dtype),
        ] + _residual_units(out_channels, use_snake, rngs, dtype, remat))

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


def channel_ladder(channels: int, c_mults: tuple[int, ...]) -> list[int]:
    """Widths between blocks: `[1] + c_mults` times `channels` (the reference prepends the 1)."""
    return [channels * m for m in (1, *c_mults)]


class OobleckEncoder(nnx.Module):
    """audio `[B, T, in_channels]` → `[B, T / prod(strides), out_channels]` (NWC).

    `layers` = [WNConv k7, EncoderBlock × len(strides), Act, WNConv k3], as the reference's `encoder.layers`.
    """

    def __init__(self, in_channels: int, channels: int, c_mults: tuple[int, ...], strides: tuple[int, ...],
                 out_channels: int, *, use_snake: bool, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 remat: bool = False):
        widths = channel_ladder(channels, c_mults)
        layers: list[nnx.Module] = [WNConv1d(in_channels, widths[0], 7, rngs=rngs, dtype=dtype)]
        layers += [EncoderBlock(widths[i], widths[i + 1], stride, use_snake=use_snake, rngs=rngs, dtype=dtype,
                                remat=remat) for i, stride in enumerate(strides)]
        layers += [activation(widths[-1], use_snake, dtype), WNConv1d(widths[-1], out_channels, 3, rngs=rngs,
                                                                      dtype=dtype)]
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = constrain(layer(x), ACTIVATION_AXES)
        return x


class OobleckDecoder(nnx.Module):
    """latents `[B, F, latent_dim]` → audio `[B, F · prod(strides), out_channels]` (NWC).

    `layers` = [WNConv k7, DecoderBlock × len(strides) (widest first), Act, WNConv k7 without bias]; the reference's
    trailing Identity/Tanh (index 8) holds no parameters and is the `final_tanh` flag here. `upsample`: each
    block's upsampling layer (DecoderBlock).
    """

    def __init__(self, latent_dim: int, channels: int, c_mults: tuple[int, ...], strides: tuple[int, ...],
                 out_channels: int, *, use_snake: bool, final_tanh: bool, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 remat: bool = False, upsample: str = "transpose"):
        widths = channel_ladder(channels, c_mults)
        layers: list[nnx.Module] = [WNConv1d(latent_dim, widths[-1], 7, rngs=rngs, dtype=dtype)]
        layers += [DecoderBlock(widths[i + 1], widths[i], strides[i], use_snake=use_snake, rngs=rngs, dtype=dtype,
                                remat=remat, upsample=upsample) for i in reversed(range(len(strides)))]
        layers += [activation(widths[0], use_snake, dtype),
                   WNConv1d(widths[0], out_channels, 7, use_bias=False, rngs=rngs, dtype=dtype)]
        self.layers = nnx.List(layers)
        self.final_tanh = final_tanh

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = constrain(layer(x), ACTIVATION_AXES)
        return jnp.tanh(x) if self.final_tanh else x


"""Numbers as features: the reference's NumberEmbedder (SAO's seconds_start / seconds_total conditioner), shared by
the conditioner's number entries and the embedded text encoder's number-aware token embedding; and the fixed
ExpoFourier features of Stable Audio 3 (its DiT timestep features and its `seconds_total` conditioner)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.errors import ConfigError


@functools.partial(jax.jit, static_argnums=(1,))
def _symmetric_uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)  # one compiled program per shape


def torch_linear_init(rngs: nnx.Rngs, fan_in: int, shape: Sequence[int]) -> jax.Array:
    # PyTorch's nn.Linear default (weight and bias): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return _symmetric_uniform(rngs.params(), tuple(shape), 1.0 / math.sqrt(fan_in))


def expo_fourier_frequencies(dim: int, min_freq: float = 0.5, max_freq: float = 10000.0) -> np.ndarray:
    """The dim/2 float32 frequencies of the reference's ExpoFourierFeatures, exp(linspace(log min, log max)), with
    torch.linspace's float32 steps (the first half counted from the start, the second from the end), so the values
    are the reference's bit for bit: at 1e4 Hz one float32 step moves the phase at t = 1 by ~4e-3 rad."""
    half = dim // 2
    index = np.arange(half)
    step = np.float32(1.0) / np.float32(half - 1)
    ramp = np.where(index < half // 2, index.astype(np.float32) * step,
                    np.float32(1.0) - (half - 1 - index).astype(np.float32) * step).astype(np.float32)
    log_min, log_max = math.log(min_freq), math.log(max_freq)
    exponent = ramp * np.float32(log_max - log_min) + np.float32(log_min)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def expo_fourier_features(t: jax.Array, dim: int) -> jax.Array:
    """t [B] -> [cos 2πtf, sin 2πtf] [B, dim] in float32 with f = expo_fourier_frequencies(dim) (cos first, as the
    reference; no parameters). Computed as ((t·f)·2)·π in float32, the reference's order."""
    if dim % 2:
        raise ConfigError(f"expo Fourier features: dim={dim} must be even")
    freqs = jnp.asarray(expo_fourier_frequencies(dim))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :] * 2 * jnp.float32(math.pi)
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


NUMBER_FEATURES = ("learned", "expo")


class NumberConditioner(nnx.Module):
    """A float in [min_val, max_val] -> one token [B, 1, output_dim] (reference NumberEmbedder).

    u = (clip(v, min, max) - min) / (max - min); then, with `features="learned"` (SAO), [u, sin(2π u w), cos(2π u w)]
    with w [fourier_dim/2] learned frequencies ~ N(0, 1) and Linear(fourier_dim + 1 -> output_dim) with bias; with
    `features="expo"` (Stable Audio 3's seconds_total), expo_fourier_features(u, fourier_dim) and
    Linear(fourier_dim -> output_dim) with bias (no `frequencies` parameter).
    """

    # Its Linear is a weight adapters' target, as the reference embedder's `embedding.1` is SA3 LoRA's (spec §8.1).
    adaptable_kernels = {"kernel": 1}

    def __init__(self, output_dim: int, min_val: float = 0.0, max_val: float = 1.0, *, rngs: nnx.Rngs,
                 fourier_dim: int = 256, features: str = "learned", dtype: Any = jnp.float32):
        if max_val <= min_val:
            raise ConfigError(f"number conditioner: max_val={max_val} must exceed min_val={min_val}")
        if features not in NUMBER_FEATURES:
            raise ConfigError(f"number conditioner: fourier_features_type={features!r}: expected one of "
                              f"{', '.join(NUMBER_FEATURES)}")
        self.min_val, self.max_val = float(min_val), float(max_val)
        self.features_type, self.fourier_dim = features, fourier_dim
        in_dim = fourier_dim if features == "expo" else fourier_dim + 1
        if features == "learned":
            self.frequencies = nnx.Param(jax.random.normal(rngs.params(), (fourier_dim // 2,)), out_sharding=(None,))
        self.kernel = nnx.Param(torch_linear_init(rngs, in_dim, (in_dim, output_dim)),
                                out_sharding=(None, "cond_embed"))
        self.bias = nnx.Param(torch_linear_init(rngs, in_dim, (output_dim,)), out_sharding=("cond_embed",))
        self.dtype = dtype

    def normalise(self, values: jax.Array) -> jax.Array:
        values = jnp.clip(jnp.asarray(values, jnp.float32), self.min_val, self.max_val)
        return (values - self.min_val) / (self.max_val - self.min_val)

    def features(self, values: jax.Array) -> jax.Array:
        """[B] -> [B, fourier_dim + 1] in float32: the normalised value first, then sin, then cos (reference order);
        "expo": [B, fourier_dim], cos then sin."""
        if self.features_type == "expo":
            return expo_fourier_features(self.normalise(values), self.fourier_dim)
        u = self.normalise(values)[:, None]
        angles = 2 * jnp.pi * u * self.frequencies[...][None, :]
        return jnp.concatenate([u, jnp.sin(angles), jnp.cos(angles)], axis=-1)

    def __call__(self, values: jax.Array) -> tuple[jax.Array, jax.Array]:
        feats = self.features(values).astype(self.dtype)
        tokens = feats @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
        return tokens[:, None, :], jnp.ones((tokens.shape[0], 1), bool)



"""Numbers as features: the reference's NumberEmbedder (SAO's seconds_start / seconds_total conditioner), shared by
the conditioner's number entries and the embedded text encoder's number-aware token embedding."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from musicdiff.errors import ConfigError


@functools.partial(jax.jit, static_argnums=(1,))
def _symmetric_uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)  # one compiled program per shape


def torch_linear_init(rngs: nnx.Rngs, fan_in: int, shape: Sequence[int]) -> jax.Array:
    # PyTorch's nn.Linear default (weight and bias): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return _symmetric_uniform(rngs.params(), tuple(shape), 1.0 / math.sqrt(fan_in))


class NumberConditioner(nnx.Module):
    """A float in [min_val, max_val] -> one token [B, 1, output_dim] (reference NumberEmbedder).

    u = (clip(v, min, max) - min) / (max - min); features [u, sin(2π u w), cos(2π u w)] with w [fourier_dim/2] learned
    frequencies ~ N(0, 1); then Linear(fourier_dim + 1 -> output_dim) with bias.
    """

    def __init__(self, output_dim: int, min_val: float = 0.0, max_val: float = 1.0, *, rngs: nnx.Rngs,
                 fourier_dim: int = 256, dtype: Any = jnp.float32):
        if max_val <= min_val:
            raise ConfigError(f"number conditioner: max_val={max_val} must exceed min_val={min_val}")
        self.min_val, self.max_val = float(min_val), float(max_val)
        self.frequencies = nnx.Param(jax.random.normal(rngs.params(), (fourier_dim // 2,)), out_sharding=(None,))
        self.kernel = nnx.Param(torch_linear_init(rngs, fourier_dim + 1, (fourier_dim + 1, output_dim)),
                                out_sharding=(None, "cond_embed"))
        self.bias = nnx.Param(torch_linear_init(rngs, fourier_dim + 1, (output_dim,)), out_sharding=("cond_embed",))
        self.dtype = dtype

    def normalise(self, values: jax.Array) -> jax.Array:
        values = jnp.clip(jnp.asarray(values, jnp.float32), self.min_val, self.max_val)
        return (values - self.min_val) / (self.max_val - self.min_val)

    def features(self, values: jax.Array) -> jax.Array:
        """[B] -> [B, fourier_dim + 1] in float32: the normalised value first, then sin, then cos (reference order)."""
        u = self.normalise(values)[:, None]
        angles = 2 * jnp.pi * u * self.frequencies[...][None, :]
        return jnp.concatenate([u, jnp.sin(angles), jnp.cos(angles)], axis=-1)

    def __call__(self, values: jax.Array) -> tuple[jax.Array, jax.Array]:
        feats = self.features(values).astype(self.dtype)
        tokens = feats @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
        return tokens[:, None, :], jnp.ones((tokens.shape[0], 1), bool)



"""Training timestep samplers: pure functions of a PRNG key returning t [batch] in [0, 1] (float32).

- uniform: U[t_min, t_max) (the SAO recipe; the reference's scrambled Sobol draws are statistically equivalent).
- logit_normal: sigmoid(mean + std·z), z ~ N(0, 1) (SD3 / the reference's "logit_normal").
- truncated_logit_normal: logit-normal restricted exactly to [t_min, t_max] by inverse-CDF sampling of z between the
  bounds' logits, so no probability mass is clipped onto the bounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.special import logit, ndtr, ndtri

from musicdiff.errors import ConfigError


def uniform_timesteps(key: jax.Array, batch_size: int, t_min: float = 0.0, t_max: float = 1.0) -> jax.Array:
    return jax.random.uniform(key, (batch_size,), jnp.float32, t_min, t_max)


def logit_normal_timesteps(key: jax.Array, batch_size: int, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,), jnp.float32))


def truncated_logit_normal_timesteps(key: jax.Array, batch_size: int, mean: float = 0.0, std: float = 1.0,
                                     t_min: float = 0.0, t_max: float = 1.0) -> jax.Array:
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ConfigError(f"config.objective.t_min={t_min}, t_max={t_max}: need 0 <= t_min < t_max <= 1")
    # Standard-normal CDF values of the bounds; logit(0) = -inf and logit(1) = +inf give 0 and 1.
    lo = ndtr((logit(jnp.float32(t_min)) - mean) / std)
    hi = ndtr((logit(jnp.float32(t_max)) - mean) / std)
    u = jax.random.uniform(key, (batch_size,), jnp.float32, lo, hi)
    t = jax.nn.sigmoid(mean + std * ndtri(u))
    return jnp.clip(t, t_min, t_max)  # float32 rounding at the tails only


def sample_timesteps(key: jax.Array, batch_size: int, objective_config: ml_collections.ConfigDict) -> jax.Array:
    """The sampler named by `config.objective.timestep_sampler`, with its options from the same section."""
    name = objective_config.timestep_sampler
    t_min, t_max = objective_config.get("t_min", 0.0), objective_config.get("t_max", 1.0)
    mean, std = objective_config.get("logit_mean", 0.0), objective_config.get("logit_std", 1.0)
    if name == "uniform":
        return uniform_timesteps(key, batch_size, t_min, t_max)
    if name == "logit_normal":
        return logit_normal_timesteps(key, batch_size, mean, std)
    if name == "truncated_logit_normal":
        return truncated_logit_normal_timesteps(key, batch_size, mean, std, t_min, t_max)
    raise ConfigError(f"config.objective.timestep_sampler='{name}': expected uniform, logit_normal or "
                      f"truncated_logit_normal")

"""Training timestep samplers: pure functions of a PRNG key returning t [batch] in [0, 1] (float32).

- uniform: U[t_min, t_max) (the SAO recipe; the reference's scrambled Sobol draws are statistically equivalent).
- logit_normal: sigmoid(mean + std·z), z ~ N(0, 1) (SD3 / the reference's "logit_normal").
- truncated_logit_normal: logit-normal restricted exactly to [t_min, t_max] by inverse-CDF sampling of z between the
  bounds' logits, so no probability mass is clipped onto the bounds.
Stable Audio 3's samplers (its training wrapper; stable_audio_3.md §3.5), as its code computes them from one normal or
uniform draw per sample (the `*_from_*` functions are those maps, so they can be checked against the reference on the
same draws):
- sa3_truncated_logit_normal (SA3's "trunc_logit_normal", its LoRA default): s = sigmoid(Φ⁻¹(lo + (1 − lo)·Φ(z))) with
  lo = Φ(logit sa3_left_trunc), a logit-normal cut below sa3_left_trunc (0.075); rescaled to (s − 0.075)/0.925 and
  flipped, t = 1 − that, so most samples sit at high noise and none at exactly t = 0.
- log_snr: log-SNR λ ~ N(mean_logsnr −1.2, std_logsnr 2), t = sigmoid(−λ) clipped to [1e-4, 1 − 1e-4].
- log_snr_uniform: λ ~ U(min_logsnr −6, max_logsnr 5), t = sigmoid(−λ) clipped likewise.
`p_one_shot` > 0 (any sampler) sets t = 1 with that probability (SA3's one-shot training of pure-noise inputs).
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


LOGSNR_CLIP = 1e-4  # SA3 clamps log-SNR-drawn times to [1e-4, 1 - 1e-4]


def sa3_truncated_logit_normal_from_normal(z: jax.Array, left_trunc: float = 0.075) -> jax.Array:
    lower = ndtr(logit(jnp.float32(left_trunc)))
    s = jax.nn.sigmoid(ndtri(lower + (1.0 - lower) * ndtr(z)))
    return 1.0 - (s - left_trunc) / (1.0 - left_trunc)


def log_snr_timesteps_from_log_snr(log_snr: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(-log_snr), LOGSNR_CLIP, 1.0 - LOGSNR_CLIP)


SAMPLERS = ("uniform", "logit_normal", "truncated_logit_normal", "sa3_truncated_logit_normal", "log_snr",
            "log_snr_uniform")


def sample_timesteps(key: jax.Array, batch_size: int, objective_config: ml_collections.ConfigDict) -> jax.Array:
    """The sampler named by `config.objective.timestep_sampler`, with its options from the same section."""
    name = objective_config.timestep_sampler
    get = objective_config.get
    t_min, t_max = get("t_min", 0.0), get("t_max", 1.0)
    mean, std = get("logit_mean", 0.0), get("logit_std", 1.0)
    shape = (batch_size,)
    if name == "uniform":
        t = uniform_timesteps(key, batch_size, t_min, t_max)
    elif name == "logit_normal":
        t = logit_normal_timesteps(key, batch_size, mean, std)
    elif name == "truncated_logit_normal":
        t = truncated_logit_normal_timesteps(key, batch_size, mean, std, t_min, t_max)
    elif name == "sa3_truncated_logit_normal":
        t = sa3_truncated_logit_normal_from_normal(jax.random.normal(key, shape, jnp.float32),
                                                   get("sa3_left_trunc", 0.075))
    elif name == "log_snr":
        draw = jax.random.normal(key, shape, jnp.float32)
        t = log_snr_timesteps_from_log_snr(get("mean_logsnr", -1.2) + get("std_logsnr", 2.0) * draw)
    elif name == "log_snr_uniform":
        low, high = get("min_logsnr", -6.0), get("max_logsnr", 5.0)
        t = log_snr_timesteps_from_log_snr(jax.random.uniform(key, shape, jnp.float32, low, high))
    else:
        raise ConfigError(f"config.objective.timestep_sampler='{name}': expected one of {', '.join(SAMPLERS)}")
    p_one_shot = get("p_one_shot", 0.0)
    if p_one_shot:
        # A key of its own, derived so the draws of t stay what they are without p_one_shot.
        t = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), shape) < p_one_shot, 1.0, t)
    return t

"""Noise schedules: discrete DDPM β schedules and the continuous (α, σ) pairs of the v and flow objectives.

Continuous time t ∈ [0, 1] runs from data (t = 0) to noise (t = 1) for every objective.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from musicdiff.errors import ConfigError


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020): β linear from beta_start to beta_end over num_steps (1000 steps: 1e-4 .. 0.02)."""
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): ᾱ(s) = f(s)/f(0), f(s) = cos²((s/T + offset)/(1 + offset)·π/2), β clipped."""
    s = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((s + offset) / (1 + offset) * np.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: it holds arrays
class DiscreteSchedule:
    """β_n for steps n = 0..T-1 (Ho et al.'s steps 1..T) and ᾱ_n = Π_{i<=n} (1 - β_i), kept in float64 numpy."""

    betas: np.ndarray

    def __post_init__(self):
        if len(self.betas) < 2:
            raise ConfigError(f"config.objective.ddpm_num_steps={len(self.betas)}: a DDPM schedule needs >= 2 steps")

    @classmethod
    def make(cls, kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteSchedule:
        if kind == "linear":
            return cls(linear_betas(num_steps, beta_start, beta_end))
        if kind == "cosine":
            return cls(cosine_betas(num_steps))
        raise ConfigError(f"config.objective.ddpm_schedule='{kind}': expected linear or cosine")

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alpha_bars(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    def index(self, t: jax.Array) -> jax.Array:
        """Continuous t ∈ [0, 1] -> step index floor(t·T), clipped to T-1 (t = 1 is the last step)."""
        return jnp.clip(jnp.floor(t * self.num_steps), 0, self.num_steps - 1).astype(jnp.int32)

    def model_time(self, n: jax.Array) -> jax.Array:
        """The time a DiT sees at step n: n / (T - 1) ∈ [0, 1], so a sampler's integer timestep k maps to k/(T-1)."""
        return jnp.asarray(n, jnp.float32) / (self.num_steps - 1)

    def time_of_index(self, n: jax.Array) -> jax.Array:
        """The centre of step n's interval, so index(time_of_index(n)) == n."""
        return (jnp.asarray(n, jnp.float32) + 0.5) / self.num_steps

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """sqrt(ᾱ), sqrt(1 - ᾱ) at the step of t."""
        alpha_bar = jnp.asarray(self.alpha_bars, jnp.float32)[self.index(t)]
        return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def cosine_alpha_sigma(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The v-objective's schedule (SAO): α = cos(πt/2), σ = sin(πt/2), so α² + σ² = 1."""
    # α as sin(π(1 - t)/2): exactly 0 at t = 1 in float32, where cos(π/2) is -4e-8.
    return jnp.sin(0.5 * jnp.pi * (1.0 - t)), jnp.sin(0.5 * jnp.pi * t)


def flow_alpha_sigma(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rectified flow's straight path: α = 1 - t, σ = t."""
    return 1.0 - t, t

"""Length-aware time shifts (Stable Audio 3, spec §3.6): monotone maps t -> t' of rectified-flow time [0, 1] (1 =
noise) that depend on the effective length L (latent frames), so longer clips spend more of a schedule's steps at
high noise. Pure functions of (t, L); L may be a traced scalar, or an array broadcasting against t.

- "full" (the reference's DistributionShift): μ = −(base + (max_shift − base)·(clip(L, min_length, max_length) −
  min_length)/(max_length − min_length)), α = e^{−μ}, t' = α·t/(1 + (α − 1)·t) (the SD3 / Flux shift; the reference
  writes it 1 − e^μ/(e^μ + t/(1 − t))).
- "flux": the same map with log α interpolated linearly in log L from alpha_min at min_length to alpha_max at
  max_length (L clipped to that range).
- "logsnr" (LogSNRShift): λ_start = anchor_logsnr − rate·log2(L/anchor_length), λ = λ_end − t·(λ_end − λ_start),
  t' = sigmoid(−λ), with t = 0 and t = 1 mapped exactly to 0 and 1. rate 0 makes it length-independent:
  t' = sigmoid(8.2·t − 2) with the defaults.
- "none": the identity.

Schedules (`shifted_times`) follow the reference's sampler: a uniform grid from the start time to 0, warped. The
reference warps linspace(t_max, 0) and then resets the first entry to t_max, which is not monotone for t_max < 1
(audio-to-audio, spec §7); here the uniform grid starts at the shift's inverse of t_max instead, so the warped grid
starts exactly at t_max and stays monotone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from musicdiff.errors import ConfigError, refuse_unknown_options

TIME_SHIFTS = ("none", "full", "flux", "logsnr")


@dataclasses.dataclass(frozen=True)
class TimeShift:
    name: str = "none"  # one of TIME_SHIFTS
    base: float = 0.5  # full: log α at min_length
    max_shift: float = 1.15  # full: log α at max_length
    min_length: float = 256.0  # full / flux: lengths (latent frames) below it take its α
    max_length: float = 4096.0  # full / flux: lengths above it take its α
    alpha_min: float = 6.93  # flux: α at min_length
    alpha_max: float = 6.93  # flux: α at max_length
    anchor_length: float = 2000.0  # logsnr: the length whose start log-SNR is anchor_logsnr
    anchor_logsnr: float = -6.2  # logsnr: log-SNR at t = 1 for anchor_length
    rate: float = 0.0  # logsnr: change of the start log-SNR per doubling of the length
    logsnr_end: float = 2.0  # logsnr: log-SNR at t = 0
    key: str = dataclasses.field(default="time_shift", compare=False)  # where it was configured, for errors

    def __post_init__(self):
        if self.name not in TIME_SHIFTS:
            raise ConfigError(f"config.{self.key}.name={self.name!r}: expected one of {', '.join(TIME_SHIFTS)}")
        if self.name in ("full", "flux") and not 0 < self.min_length < self.max_length:
            raise ConfigError(f"config.{self.key}.min_length={self.min_length}, max_length={self.max_length}: need "
                              f"0 < min_length < max_length (latent frames)")
        if self.name == "flux" and not (self.alpha_min > 0 and self.alpha_max > 0):
            raise ConfigError(f"config.{self.key}.alpha_min/alpha_max = {self.alpha_min}/{self.alpha_max}: the "
                              f"shift factors must be positive")
        if self.name == "logsnr" and not (self.anchor_length > 0 and self.logsnr_end > self.anchor_logsnr):
            raise ConfigError(f"config.{self.key}: logsnr needs anchor_length > 0 and logsnr_end > anchor_logsnr "
                              f"(got {self.anchor_length}, {self.logsnr_end}, {self.anchor_logsnr})")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None, key: str = "time_shift") -> TimeShift:
        """From a config section {name, options}; None or an empty section is "none"."""
        values = dict(section or {})
        refuse_unknown_options(values, {f.name for f in dataclasses.fields(cls)} - {"key"}, f"config.{key}",
                               "a time-shift")
        return cls(**{k: (str(v) if k == "name" else float(v)) for k, v in values.items()}, key=key)

    @property
    def active(self) -> bool:
        return self.name != "none"

    def alpha(self, length) -> jax.Array:
        """The shift factor α(L) of "full" and "flux"."""
        length = jnp.asarray(length, jnp.float32)
        fraction = ((jnp.clip(length, self.min_length, self.max_length) - self.min_length)
                    / (self.max_length - self.min_length))
        if self.name == "full":
            return jnp.exp(self.base + (self.max_shift - self.base) * fraction)
        log_fraction = ((jnp.log(jnp.clip(length, self.min_length, self.max_length)) - math.log(self.min_length))
                        / (math.log(self.max_length) - math.log(self.min_length)))
        return jnp.exp(math.log(self.alpha_min) + (math.log(self.alpha_max) - math.log(self.alpha_min)) * log_fraction)

    def _logsnr_start(self, length) -> jax.Array:
        length = jnp.asarray(length, jnp.float32)
        return self.anchor_logsnr - self.rate * jnp.log2(length / self.anchor_length)

    def __call__(self, t, length) -> jax.Array:
        """t' for times t (any shape) at effective length L (broadcasting against t)."""
        t = jnp.asarray(t, jnp.float32)
        if self.name == "none":
            return t
        if self.name in ("full", "flux"):
            alpha = self.alpha(length)
            return alpha * t / (1.0 + (alpha - 1.0) * t)
        start = self._logsnr_start(length)
        shifted = jax.nn.sigmoid(-(self.logsnr_end - t * (self.logsnr_end - start)))
        return jnp.where(t <= 0.0, 0.0, jnp.where(t >= 1.0, 1.0, shifted))

    def inverse(self, shifted, length) -> jax.Array:
        """The t whose shift is `shifted` (clipped to [0, 1])."""
        shifted = jnp.asarray(shifted, jnp.float32)
        if self.name == "none":
            return shifted
        if self.name in ("full", "flux"):
            alpha = self.alpha(length)
            return shifted / (alpha - (alpha - 1.0) * shifted)
        start = self._logsnr_start(length)
        logsnr = jnp.log1p(-shifted) - jnp.log(shifted)
        t = jnp.clip((self.logsnr_end - logsnr) / (self.logsnr_end - start), 0.0, 1.0)
        return jnp.where(shifted <= 0.0, 0.0, jnp.where(shifted >= 1.0, 1.0, t))


def time_shift_config() -> dict[str, Any]:
    """Every option with its default (name "none"), for a config section that command-line overrides can set."""
    return {f.name: f.default for f in dataclasses.fields(TimeShift) if f.name != "key"}


def shifted_times(shift: TimeShift, steps: int, t_max: float, length) -> jax.Array:
    """[steps + 1] sampler times from t_max down to 0: a uniform grid from shift⁻¹(t_max) to 0, warped by the shift
    at length L (a scalar, possibly traced). Entries 0 and −1 are exactly t_max and 0."""
    start = shift.inverse(jnp.float32(t_max), length)
    grid = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32) * start
    return shift(grid, length).at[0].set(t_max).at[-1].set(0.0).astype(jnp.float32)


__all__ = ["TIME_SHIFTS", "TimeShift", "shifted_times", "time_shift_config"]

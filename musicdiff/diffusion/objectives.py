"""Diffusion training objectives, registered by name: what is noised, what the model predicts, the time the model
sees, and the matching sampler-side parameterisation.

Every objective uses continuous training time t ∈ [0, 1] from data (0) to noise (1), x_t = α(t)·x0 + σ(t)·ε, and
offers
    add_noise(x0, noise, t) -> x_t       target(x0, noise, t) -> regression target    loss(out, target, mask)
    model_time(t) -> the time fed to the model         parameterization -> what samplers use (diffusion/parameterization)
Arrays are [B, C, L] latents, t is [B]; the padding mask is [B, L] (True/1 = a real latent frame).

Model time has one definition per objective, shared by training and sampling: the parameterisation's
`model_time(s)` maps its interpolant's own time s to the model's input, and training calls it at
`interpolant_time(t)`, so a model trained with `model_time(t)` is sampled at exactly the times it was trained at.

- "v" (SAO, spec §3.1): α = cos(πt/2), σ = sin(πt/2), target v = α·ε − σ·x0; model time t.
- "rectified_flow" (spec §3.2): x_t = (1 − t)·x0 + t·ε, target ε − x0 (the velocity dx_t/dt from data to noise);
  model time t. "rf_denoiser" is the reference's name for the same training objective on models meant for few-step
  sampling (SAO Small / ARC), so its default sampler is ping-pong.
- "ddpm_eps" (Ho et al. 2020, Algorithm 1): T discrete steps with linear or cosine β, x_t = sqrt(ᾱ_n)·x0 +
  sqrt(1 − ᾱ_n)·ε at step n = floor(t·T) (clipped to T − 1), target ε; the model sees n/(T − 1). Samplers move
  along the fractional index s ∈ [0, T − 1] of the same table and feed the model s/(T − 1).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from musicdiff.diffusion.parameterization import (CosineInterpolant, DiscreteVPInterpolant, LinearInterpolant,
                                                  Parameterization)
from musicdiff.diffusion.schedules import DiscreteSchedule, cosine_alpha_sigma, flow_alpha_sigma
from musicdiff.errors import ConfigError


def _expand(t: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] broadcastable against `like`."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error in fp32. With a [B, L] mask (spec §4.5): each sample's mean over its valid frames × all
    channels of [B, C, L], then the mean over the batch, so a short clip weighs as much as a long one; a sample with
    no valid frame contributes 0."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if mask is None:
        return jnp.mean(err)
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[:, None, :], err.shape)
    axes = tuple(range(1, err.ndim))
    per_sample = jnp.sum(err * weight, axis=axes) / jnp.maximum(jnp.sum(weight, axis=axes), 1.0)
    return jnp.mean(per_sample)


class Objective(abc.ABC):
    """Shared algebra: subclasses define alpha_sigma, target and their parameterisation."""

    name = ""
    default_sampler = ""  # what previews and `launch.generate` use when nothing else is asked for
    parameterization: Parameterization

    @abc.abstractmethod
    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """α(t), σ(t) of x_t = α·x0 + σ·ε."""

    @abc.abstractmethod
    def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the model regresses."""

    def interpolant_time(self, t: jax.Array) -> jax.Array:
        """Training time t -> the parameterisation interpolant's time at the same noise level."""
        return jnp.asarray(t, jnp.float32)

    def model_time(self, t: jax.Array) -> jax.Array:
        """The time the model sees in training: the parameterisation's model time, the one samplers use."""
        return self.parameterization.model_time(self.interpolant_time(t))

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise

    def loss(self, model_out: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return masked_mse(model_out, target, mask)

    @property
    def betas(self) -> np.ndarray | None:
        """The discrete β schedule (DDPM ancestral sampling needs it), or None for continuous objectives."""
        return None


class VPrediction(Objective):
    name = "v"
    default_sampler = "ddim"
    parameterization = Parameterization(CosineInterpolant(), "v")

    def alpha_sigma(self, t):
        return cosine_alpha_sigma(jnp.asarray(t, jnp.float32))

    def target(self, x0, noise, t):
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * noise - _expand(sigma, x0) * x0


class RectifiedFlow(Objective):
    name = "rectified_flow"
    default_sampler = "rf-euler"
    parameterization = Parameterization(LinearInterpolant(), "velocity")

    def alpha_sigma(self, t):
        return flow_alpha_sigma(jnp.asarray(t, jnp.float32))

    def target(self, x0, noise, t):
        return noise - x0


class RectifiedFlowDenoiser(RectifiedFlow):
    name = "rf_denoiser"
    default_sampler = "pingpong"


class DDPMEpsilon(Objective):
    name = "ddpm_eps"
    default_sampler = "ddpm"

    def __init__(self, schedule: DiscreteSchedule):
        self.schedule = schedule
        interpolant = DiscreteVPInterpolant.from_betas(schedule.betas)
        self.parameterization = Parameterization(interpolant, "eps", model_time=schedule.model_time)

    def alpha_sigma(self, t):
        return self.schedule.alpha_sigma(jnp.asarray(t, jnp.float32))

    def interpolant_time(self, t):
        return self.schedule.index(jnp.asarray(t, jnp.float32)).astype(jnp.float32)

    def target(self, x0, noise, t):
        return noise

    @property
    def betas(self) -> np.ndarray:
        return np.asarray(self.schedule.betas)


def _ddpm(config: Mapping[str, Any]) -> DDPMEpsilon:
    return DDPMEpsilon(DiscreteSchedule.make(config.get("ddpm_schedule", "linear"), config.get("ddpm_num_steps", 1000),
                                             config.get("ddpm_beta_start", 1e-4), config.get("ddpm_beta_end", 0.02)))


OBJECTIVES: dict[str, Callable[[Mapping[str, Any]], Objective]] = {}


def register_objective(name: str, factory: Callable[[Mapping[str, Any]], Objective]) -> None:
    """Makes `config.objective.name = name` build `factory(config.objective)` for training and sampling."""
    OBJECTIVES[name] = factory


register_objective("v", lambda config: VPrediction())
register_objective("rectified_flow", lambda config: RectifiedFlow())
register_objective("rf_denoiser", lambda config: RectifiedFlowDenoiser())
register_objective("ddpm_eps", _ddpm)


def make_objective(objective_config: Mapping[str, Any]) -> Objective:
    """The objective named by `config.objective.name`, with its options from the same section."""
    name = objective_config["name"]
    if name not in OBJECTIVES:
        raise ConfigError(f"config.objective.name='{name}': expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](objective_config)


__all__ = ["OBJECTIVES", "DDPMEpsilon", "Objective", "RectifiedFlow", "RectifiedFlowDenoiser", "VPrediction",
           "make_objective", "masked_mse", "register_objective"]

"""Diffusion training objectives: what is noised, what the model predicts, and how to read its output back.

Every objective uses continuous time t ∈ [0, 1] from data (0) to noise (1), x_t = α(t)·x0 + σ(t)·ε, and offers
    add_noise(x0, noise, t) -> x_t            target(x0, noise, t) -> regression target
    model_time(t) -> the time fed to the model  loss(model_out, target, mask) -> masked MSE
    to_x0(x_t, model_out, t), to_eps(x_t, model_out, t) -> estimates of x0 and ε for samplers
Arrays are [B, C, L] latents, t is [B]; the padding mask is [B, L] (True/1 = a real latent frame).

- VPrediction (SAO, spec §3.1): α = cos(πt/2), σ = sin(πt/2), target v = α·ε - σ·x0.
- RectifiedFlow (spec §3.2): x_t = (1 - t)·x0 + t·ε, target ε - x0, i.e. the velocity dx_t/dt pointing from data to
  noise; a sampler integrates it from t = 1 down to 0 (x_{t-dt} = x_t - dt·v̂).
- DDPMEpsilon (Ho et al. 2020, Algorithm 1): T discrete steps with linear or cosine β, x_t = sqrt(ᾱ_n)·x0 +
  sqrt(1 - ᾱ_n)·ε at step n = floor(t·T) (clipped to T - 1), target ε; the model sees n/(T - 1), so samplers that
  count integer timesteps k = 0..T-1 pass k/(T - 1).
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import ml_collections

from musicdiff.errors import ConfigError

from musicdiff.diffusion.schedules import DiscreteSchedule, cosine_alpha_sigma, flow_alpha_sigma


def _expand(t: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] broadcastable against `like`."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error in fp32; with a [B, L] mask, the mean over the valid frames of [B, C, L] (all channels)."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if mask is None:
        return jnp.mean(err)
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[:, None, :], err.shape)
    return jnp.sum(err * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class Objective(abc.ABC):
    """Shared algebra: subclasses define alpha_sigma, target and the two estimates."""

    name = ""

    @abc.abstractmethod
    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """α(t), σ(t) of x_t = α·x0 + σ·ε."""

    @abc.abstractmethod
    def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the model regresses."""

    @abc.abstractmethod
    def to_x0(self, x_t: jax.Array, model_out: jax.Array, t: jax.Array) -> jax.Array:
        """The clean-latent estimate implied by a model output."""

    @abc.abstractmethod
    def to_eps(self, x_t: jax.Array, model_out: jax.Array, t: jax.Array) -> jax.Array:
        """The noise estimate implied by a model output."""

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise

    def model_time(self, t: jax.Array) -> jax.Array:
        return t

    def loss(self, model_out: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return masked_mse(model_out, target, mask)


class VPrediction(Objective):
    name = "v"

    def alpha_sigma(self, t):
        return cosine_alpha_sigma(jnp.asarray(t, jnp.float32))

    def target(self, x0, noise, t):
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * noise - _expand(sigma, x0) * x0

    def to_x0(self, x_t, model_out, t):
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x_t) * x_t - _expand(sigma, x_t) * model_out

    def to_eps(self, x_t, model_out, t):
        alpha, sigma = self.alpha_sigma(t)
        return _expand(sigma, x_t) * x_t + _expand(alpha, x_t) * model_out


class RectifiedFlow(Objective):
    name = "rectified_flow"

    def alpha_sigma(self, t):
        return flow_alpha_sigma(jnp.asarray(t, jnp.float32))

    def target(self, x0, noise, t):
        return noise - x0

    def to_x0(self, x_t, model_out, t):
        return x_t - _expand(t, x_t) * model_out

    def to_eps(self, x_t, model_out, t):
        return x_t + (1.0 - _expand(t, x_t)) * model_out


class DDPMEpsilon(Objective):
    name = "ddpm_eps"

    def __init__(self, schedule: DiscreteSchedule):
        self.schedule = schedule

    def alpha_sigma(self, t):
        return self.schedule.alpha_sigma(jnp.asarray(t, jnp.float32))

    def model_time(self, t):
        return self.schedule.model_time(self.schedule.index(jnp.asarray(t, jnp.float32)))

    def target(self, x0, noise, t):
        return noise

    def to_x0(self, x_t, model_out, t):
        alpha, sigma = self.alpha_sigma(t)
        return (x_t - _expand(sigma, x_t) * model_out) / _expand(alpha, x_t)

    def to_eps(self, x_t, model_out, t):
        return model_out


def make_objective(objective_config: ml_collections.ConfigDict) -> Objective:
    """The objective named by `config.objective.name` ("rf_denoiser" trains like "rectified_flow")."""
    name = objective_config.name
    if name == "v":
        return VPrediction()
    if name in ("rectified_flow", "rf_denoiser"):
        return RectifiedFlow()
    if name == "ddpm_eps":
        return DDPMEpsilon(DiscreteSchedule.make(
            objective_config.get("ddpm_schedule", "linear"), objective_config.get("ddpm_num_steps", 1000),
            objective_config.get("ddpm_beta_start", 1e-4), objective_config.get("ddpm_beta_end", 0.02)))
    raise ConfigError(f"config.objective.name='{name}': expected v, rectified_flow, rf_denoiser or ddpm_eps")

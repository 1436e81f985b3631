"""Diffusion objectives, schedules and timestep samplers against closed forms; a tiny DiT fits a fixed batch."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.diffusion.objectives import DDPMEpsilon, RectifiedFlow, VPrediction, make_objective, masked_mse
from musicdiff.diffusion.schedules import DiscreteSchedule
from musicdiff.diffusion.timesteps import (
    logit_normal_timesteps,
    sample_timesteps,
    truncated_logit_normal_timesteps,
    uniform_timesteps,
)
from musicdiff.errors import ConfigError
from musicdiff.models import registry
from musicdiff.models.denoiser import ConditioningInputs

T_VALUES = np.array([0.0, 0.1, 0.37, 0.5, 0.81, 1.0], np.float32)


def latents(seed, batch=len(T_VALUES), channels=4, length=5):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, channels, length)), jnp.float32)


def recovered_x0(objective, x_t, target, t):
    return objective.parameterization.to_x0(target, x_t, objective.interpolant_time(t))


def test_ddpm_linear_alpha_bar_is_the_product_of_one_minus_beta():
    steps = 1000
    schedule = DiscreteSchedule.make("linear", steps, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / (steps - 1) for i in range(steps)]
    for n in (0, 1, 10, 499, 999):
        assert schedule.alpha_bars[n] == pytest.approx(math.prod(1 - b for b in betas[: n + 1]), rel=1e-10)
    assert math.sqrt(schedule.alpha_bars[-1]) == pytest.approx(0.00635, abs=5e-5)  # Ho et al.: x_T is nearly noise
    # Continuous t picks the step floor(t·T); the model sees n/(T - 1).
    objective = DDPMEpsilon(schedule)
    alpha, sigma = objective.alpha_sigma(jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(alpha ** 2, schedule.alpha_bars[[0, 500, 999]], rtol=1e-5)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(objective.model_time(jnp.array([0.0, 0.5, 1.0])), [0.0, 500 / 999, 1.0], rtol=1e-6)
    assert int(schedule.index(schedule.time_of_index(jnp.array(123)))) == 123


def test_ddpm_cosine_alpha_bar_follows_the_squared_cosine():
    steps, s = 1000, 0.008
    schedule = DiscreteSchedule.make("cosine", steps)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for n in (0, 100, 500, 900):  # far from the β clip at 0.999
        assert schedule.alpha_bars[n] == pytest.approx(f((n + 1) / steps) / f(0), rel=1e-9)
    assert schedule.betas.max() <= 0.999


def test_ddpm_noising_and_estimates():
    objective = DDPMEpsilon(DiscreteSchedule.make("linear", 1000))
    x0, eps, t = latents(0), latents(1), jnp.asarray(T_VALUES)
    x_t = objective.add_noise(x0, eps, t)
    alpha_bar = objective.schedule.alpha_bars[np.minimum(np.floor(T_VALUES * 1000), 999).astype(int)]
    expected = np.sqrt(alpha_bar)[:, None, None] * x0 + np.sqrt(1 - alpha_bar)[:, None, None] * eps
    np.testing.assert_allclose(x_t, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(objective.target(x0, eps, t), eps)
    # The sampler-side parameterisation reads the target back at the interpolant time of t (the step index).
    np.testing.assert_allclose(recovered_x0(objective, x_t, eps, t), x0, rtol=1e-3, atol=2e-3)  # 1/sqrt(ᾱ_T) ≈ 157


def test_v_target_and_exact_recovery():
    objective = VPrediction()
    x0, eps, t = latents(0), latents(1), jnp.asarray(T_VALUES)
    alpha = np.cos(np.pi * T_VALUES / 2)[:, None, None]
    sigma = np.sin(np.pi * T_VALUES / 2)[:, None, None]
    x_t = objective.add_noise(x0, eps, t)
    v = objective.target(x0, eps, t)
    np.testing.assert_allclose(x_t, alpha * x0 + sigma * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, alpha * eps - sigma * x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(recovered_x0(objective, x_t, v, t), x0, atol=1e-5)


def test_rectified_flow_target_and_recovery():
    objective = RectifiedFlow()
    x0, eps, t = latents(0), latents(1), jnp.asarray(T_VALUES)
    x_t = objective.add_noise(x0, eps, t)
    velocity = objective.target(x0, eps, t)
    tt = T_VALUES[:, None, None]
    np.testing.assert_allclose(x_t, (1 - tt) * x0 + tt * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(velocity, eps - x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(recovered_x0(objective, x_t, velocity, t), x0, atol=1e-5)
    # The velocity is dx_t/dt: a small step along it moves x_t to x_{t+dt}.
    dt = 1e-3
    moved = objective.add_noise(x0[:-1], eps[:-1], t[:-1] + dt)
    np.testing.assert_allclose(moved - x_t[:-1], dt * velocity[:-1], atol=1e-5)


def test_masked_loss_is_the_hand_computed_mean():
    pred = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 10
    target = np.ones((2, 3, 4), np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    # Per sample over its valid frames x channels (2·3 and 3·3 squares), then the mean of the two (spec §4.5).
    per_sample = [np.mean([(pred[b, c, l] - 1.0) ** 2 for c in range(3) for l in range(4) if mask[b, l]])
                  for b in range(2)]
    assert float(masked_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))) == pytest.approx(
        (per_sample[0] + per_sample[1]) / 2, rel=1e-6)
    objective = VPrediction()
    assert float(objective.loss(jnp.asarray(pred), jnp.asarray(target))) == pytest.approx(
        float(np.mean((pred - 1.0) ** 2)), rel=1e-6)
    assert float(masked_mse(jnp.asarray(pred), jnp.asarray(target), jnp.zeros((2, 4), bool))) == 0.0


N = 200_000


def test_uniform_timesteps_moments():
    t = np.asarray(uniform_timesteps(jax.random.key(0), N, 0.2, 0.6))
    assert t.min() >= 0.2 and t.max() < 0.6
    assert t.mean() == pytest.approx(0.4, abs=3e-3)
    assert t.var() == pytest.approx(0.4 ** 2 / 12, rel=2e-2)


def test_logit_normal_timesteps_moments():
    t = np.asarray(logit_normal_timesteps(jax.random.key(1), N, mean=0.5, std=0.8), np.float64)
    z = np.log(t / (1 - t))
    assert z.mean() == pytest.approx(0.5, abs=1e-2)
    assert z.std() == pytest.approx(0.8, rel=1e-2)


def test_truncated_logit_normal_bounds_and_mean():
    mean, std, t_min, t_max = 0.0, 1.0, 0.2, 0.9
    t = np.asarray(truncated_logit_normal_timesteps(jax.random.key(2), N, mean, std, t_min, t_max), np.float64)
    assert t.min() >= t_min and t.max() <= t_max
    assert t.min() < t_min + 0.01 and t.max() > t_max - 0.01
    # logit(t) is a normal truncated to [logit(t_min), logit(t_max)]: mean = μ + σ(φ(a) - φ(b)) / (Φ(b) - Φ(a)).
    a, b = (math.log(t_min / (1 - t_min)) - mean) / std, (math.log(t_max / (1 - t_max)) - mean) / std
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = mean + std * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))
    assert np.log(t / (1 - t)).mean() == pytest.approx(expected, abs=1e-2)


def test_factories_follow_the_config():
    config = load_config("configs/diffusion.py:sao").objective
    assert isinstance(make_objective(config), VPrediction)
    assert isinstance(make_objective(load_config("configs/diffusion.py:sao_small").objective), RectifiedFlow)
    ddpm = make_objective(ml_collections.ConfigDict(dict(name="ddpm_eps", ddpm_schedule="cosine", ddpm_num_steps=50)))
    assert isinstance(ddpm, DDPMEpsilon) and ddpm.schedule.num_steps == 50
    t = sample_timesteps(jax.random.key(0), 16, config)
    assert t.shape == (16,) and t.dtype == jnp.float32
    with pytest.raises(ConfigError, match="timestep_sampler"):
        sample_timesteps(jax.random.key(0), 4, ml_collections.ConfigDict(dict(timestep_sampler="sobol")))
    with pytest.raises(ConfigError, match="config.objective.name"):
        make_objective(ml_collections.ConfigDict(dict(name="edm")))


def test_tiny_dit_fits_a_fixed_batch(unsharded):
    """Smoke test: 30 Adam steps on one fixed (x0, noise, t) v-objective batch drive the loss well down."""
    config = load_config("configs/diffusion.py:tiny")
    model = registry.build(config.model, nnx.Rngs(0))
    objective = make_objective(config.objective)
    rng = np.random.default_rng(0)
    batch, length, tokens = 4, config.data.latent_length, config.data.cond_tokens
    x0 = jnp.asarray(rng.normal(size=(batch, config.model.io_channels, length)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.asarray(rng.uniform(size=batch), jnp.float32)
    cross = jnp.asarray(rng.normal(size=(batch, tokens, config.model.cond_token_dim)), jnp.float32)
    mask = jnp.ones((batch, tokens), bool)
    glob = jnp.asarray(rng.normal(size=(batch, config.model.global_cond_dim)), jnp.float32)
    x_t, target = objective.add_noise(x0, noise, t), objective.target(x0, noise, t)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return objective.loss(model(x_t, objective.model_time(t), ConditioningInputs(cross, mask, glob)), target)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]

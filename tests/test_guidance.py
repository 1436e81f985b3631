"""Guidance options against exact two-Gaussian denoisers: negative prompts, the CFG noise-level interval and
adaptive projected guidance (APG).

Data x0 ~ N(μ, s²) per condition (μ is the condition). For a state x = a·x0 + b·ε the exact posterior mean is
E[x0 | x] = μ + a·s²/(a²s² + b²)·(x − a·μ). The model below returns that mean in its own interpolant; the expected
values are the same formula in σ-space (a = 1, b = σ), so each test runs through make_denoiser's change of
interpolant, cfg_denoiser and guidance_interval's conversion of σ to model time.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from musicdiff.diffusion.parameterization import (CosineInterpolant, LinearInterpolant, Parameterization,
                                                  cfg_denoiser, doubled_call, guidance_interval, make_denoiser,
                                                  projected_guidance_denoiser)
from musicdiff.errors import ConfigError

S = 0.7  # data std
SHAPE = (3, 2, 5)
RNG = np.random.default_rng(0)
MU_COND, MU_NULL, MU_NEGATIVE = (RNG.normal(size=SHAPE).astype(np.float32) for _ in range(3))
X = RNG.normal(size=SHAPE).astype(np.float32) * 2.0

# Interpolant coefficients written out here, not taken from the code under test.
COEFFICIENTS = {"rectified_flow": lambda t: (1.0 - t, t),
                "cosine": lambda t: (jnp.cos(jnp.pi * t / 2), jnp.sin(jnp.pi * t / 2))}
INTERPOLANTS = {"rectified_flow": LinearInterpolant(), "cosine": CosineInterpolant()}


def exact_model(kind):
    def model(x, t, cond):
        a, b = COEFFICIENTS[kind](t.reshape(-1, 1, 1))
        mu = cond["mu"]
        return mu + a * S**2 / (a**2 * S**2 + b**2) * (x - a * mu)
    return model


def posterior_mean(mu, x, sigma):
    sigma = np.asarray(sigma, np.float64).reshape(-1, 1, 1)
    return mu + S**2 / (S**2 + sigma**2) * (x - mu)


def guided_denoiser(kind, null_mu, scale, interval=None):
    parameterization = Parameterization(INTERPOLANTS[kind], "x0")
    bounds = None if interval is None else guidance_interval(parameterization, *interval)
    guided = cfg_denoiser(exact_model(kind), {"mu": jnp.asarray(MU_COND)}, {"mu": jnp.asarray(null_mu)}, scale,
                          interval=bounds)
    return make_denoiser(guided, parameterization)


@pytest.mark.parametrize("kind", ["rectified_flow", "cosine"])
def test_negative_prompt_guides_away_from_its_own_gaussian(kind):
    scale = 4.0
    sigma = np.array([0.2, 1.0, 6.0], np.float32)
    out = guided_denoiser(kind, MU_NEGATIVE, scale)(jnp.asarray(X), 1.0, jnp.asarray(sigma))
    cond, negative = posterior_mean(MU_COND, X, sigma), posterior_mean(MU_NEGATIVE, X, sigma)
    np.testing.assert_allclose(np.asarray(out), negative + scale * (cond - negative), rtol=1e-4, atol=1e-4)
    # Guidance against the negative prompt's Gaussian, not against the null one.
    null = posterior_mean(MU_NULL, X, sigma)
    assert np.abs(np.asarray(out) - (null + scale * (cond - null))).max() > 0.1


@pytest.mark.parametrize("kind", ["rectified_flow", "cosine"])
def test_guidance_applies_only_inside_its_noise_interval(kind):
    scale = 5.0
    sigma = np.array([0.3, 0.8, 1.6, 4.0], np.float32)  # below, inside, inside, above [0.5, 2]
    x = np.concatenate([X, X[:1]], axis=0)
    mu_cond, mu_null = np.concatenate([MU_COND, MU_COND[:1]]), np.concatenate([MU_NULL, MU_NULL[:1]])
    parameterization = Parameterization(INTERPOLANTS[kind], "x0")
    guided = cfg_denoiser(exact_model(kind), {"mu": jnp.asarray(mu_cond)}, {"mu": jnp.asarray(mu_null)}, scale,
                          interval=guidance_interval(parameterization, 0.5, 2.0))
    out = np.asarray(make_denoiser(guided, parameterization)(jnp.asarray(x), 1.0, jnp.asarray(sigma)))
    cond, null = posterior_mean(mu_cond, x, sigma), posterior_mean(mu_null, x, sigma)
    expected = np.where(np.array([False, True, True, False]).reshape(-1, 1, 1), null + scale * (cond - null), cond)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_open_interval_is_plain_guidance_and_bad_intervals_are_refused():
    parameterization = Parameterization(LinearInterpolant(), "x0")
    assert guidance_interval(parameterization, 0.0, math.inf) == (-math.inf, math.inf)
    low, high = guidance_interval(parameterization, 1.0, 3.0)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.75)  # rectified flow: t = σ / (1 + σ)
    with pytest.raises(ConfigError, match="cfg_sigma_min"):
        guidance_interval(parameterization, 2.0, 1.0)


def apg_expected(cond, null, scale, parallel, threshold):
    """APG by hand in float64, per clip over (C, L)."""
    out = np.empty_like(cond)
    for b in range(cond.shape[0]):
        c, delta = cond[b].ravel(), (cond[b] - null[b]).ravel()
        norm = np.linalg.norm(delta)
        if threshold > 0 and norm > threshold:
            delta = delta * threshold / norm
        along = (delta @ c) / (c @ c) * c
        out[b] = (c + (scale - 1) * (delta - along + parallel * along)).reshape(cond.shape[1:])
    return out


@pytest.mark.parametrize("kind", ["rectified_flow", "cosine"])
@pytest.mark.parametrize("parallel, threshold", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5)])
def test_projected_guidance_matches_its_formula_on_exact_posteriors(kind, parallel, threshold):
    scale = 6.0
    sigma = np.array([0.2, 0.9, 3.0, 20.0], np.float32)  # the last outside the interval [0, 5]
    x = np.concatenate([X, X[:1]], axis=0)
    mu_cond, mu_null = np.concatenate([MU_COND, MU_COND[:1]]), np.concatenate([MU_NULL, MU_NULL[:1]])
    parameterization = Parameterization(INTERPOLANTS[kind], "x0")
    doubled = make_denoiser(doubled_call(exact_model(kind), {"mu": jnp.asarray(mu_cond)},
                                         {"mu": jnp.asarray(mu_null)}), parameterization)
    denoise = projected_guidance_denoiser(doubled, scale, parallel, threshold, sigma_interval=(0.0, 5.0))
    out = np.asarray(denoise(jnp.asarray(x), 1.0, jnp.asarray(sigma)), np.float64)
    cond, null = posterior_mean(mu_cond, x, sigma), posterior_mean(mu_null, x, sigma)
    expected = apg_expected(cond, null, scale, parallel, threshold)
    expected[3] = cond[3]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # Dropping the parallel part keeps the guided estimate's projection on the conditional one unchanged.
    if parallel == 0.0 and threshold == 0.0:
        for b in range(3):
            c = cond[b].ravel()
            assert out[b].ravel() @ c == pytest.approx(c @ c, rel=1e-4)


def test_projected_guidance_with_the_whole_parallel_part_is_cfg():
    parameterization = Parameterization(LinearInterpolant(), "x0")
    cond, null = {"mu": jnp.asarray(MU_COND)}, {"mu": jnp.asarray(MU_NULL)}
    apg = projected_guidance_denoiser(make_denoiser(doubled_call(exact_model("rectified_flow"), cond, null),
                                                    parameterization), 4.0, parallel=1.0)
    cfg = make_denoiser(cfg_denoiser(exact_model("rectified_flow"), cond, null, 4.0), parameterization)
    sigma = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
    np.testing.assert_allclose(np.asarray(apg(jnp.asarray(X), 1.0, sigma)), np.asarray(cfg(jnp.asarray(X), 1.0, sigma)),
                               rtol=1e-5, atol=1e-5)

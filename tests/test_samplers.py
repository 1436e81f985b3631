"""Samplers on Gaussian data, whose exact denoiser is known in closed form.

Data x0 ~ N(MU, S²) i.i.d. per dimension. For a state x = a·x0 + s·ε the exact posterior mean is
E[x0 | x] = MU + a·S²/(a²S² + s²)·(x − a·MU). Each "model" below writes that posterior in its objective's own
output (ε, v, rectified-flow velocity), time and input scaling, independently of the adapter under test.
The probability-flow ODE is linear for this data: from level (a0, s0) to the clean end it maps
x ↦ MU + S·(x − a0·MU)/√(a0²S² + s0²). That gives per-sample goldens for the deterministic samplers.
"""

import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from musicdiff.diffusion.objectives import OBJECTIVES, make_objective
from musicdiff.diffusion.parameterization import (
    CosineInterpolant,
    LinearInterpolant,
    LogSNRInterpolant,
    Parameterization,
    cfg_denoiser,
    make_denoiser,
)
from musicdiff.diffusion.samplers import (
    SAMPLERS,
    check_compatible,
    Inpaint,
    cosine_grid,
    ddim_invert,
    ddpm_posterior,
    discrete_grid,
    karras_sigmas,
    polyexponential_sigmas,
    rf_logsnr_times,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_rf_euler,
    ve_grid,
)
from musicdiff.errors import ConfigError

MU, S = 0.5, 0.7
SHAPE = (2000, 64)
BETAS = np.linspace(1e-4, 0.02, 1000)  # Ho et al.'s linear schedule, T = 1000
LOGSNR_MAX, LOGSNR_MIN = 10.0, -10.0  # a continuous VP ε-schedule with log-SNR linear in t


# ---- the Gaussian "models", each in its objective's native coordinates ---------------------------------------

def posterior_x0(x, a, s):
    return MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)


def _discrete_coefficients(t):
    """A DDPM ε-model's noise level in its training convention: training feeds the model n/(T − 1) at step n (Ho et
    al.'s ᾱ_n); between steps k-diffusion's continuous extension (log σ linear in the index)."""
    alphas_cumprod = np.cumprod(1.0 - BETAS)
    log_sigmas = jnp.asarray(0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod), jnp.float32)
    index = t * (len(BETAS) - 1)
    sigma_ve = jnp.exp(jnp.interp(index, jnp.arange(len(BETAS), dtype=jnp.float32), log_sigmas))
    return 1.0 / jnp.sqrt(1.0 + sigma_ve**2), sigma_ve / jnp.sqrt(1.0 + sigma_ve**2)


def parameterization_of(objective):
    """What sampling uses for a model trained with `objective` (its registry entry)."""
    return make_objective({"name": objective}).parameterization


COEFFICIENTS = {
    "v": lambda t: (jnp.cos(0.5 * jnp.pi * t), jnp.sin(0.5 * jnp.pi * t)),
    "eps_cosine": lambda t: (jnp.cos(0.5 * jnp.pi * t), jnp.sin(0.5 * jnp.pi * t)),
    "eps_discrete": _discrete_coefficients,
    "eps_logsnr": lambda t: (jnp.sqrt(jax.nn.sigmoid(LOGSNR_MAX + t * (LOGSNR_MIN - LOGSNR_MAX))),
                             jnp.sqrt(jax.nn.sigmoid(-(LOGSNR_MAX + t * (LOGSNR_MIN - LOGSNR_MAX))))),
    "rf": lambda t: (1.0 - t, t),
}

PARAMETERIZATIONS = {
    "v": lambda: parameterization_of("v"),
    "eps_cosine": lambda: Parameterization(CosineInterpolant(), "eps"),
    "eps_discrete": lambda: parameterization_of("ddpm_eps"),  # linear β 1e-4 .. 0.02, T = 1000: BETAS
    "eps_logsnr": lambda: Parameterization(
        LogSNRInterpolant(lambda t: LOGSNR_MAX + t * (LOGSNR_MIN - LOGSNR_MAX),
                          lambda log_snr: (LOGSNR_MAX - log_snr) / (LOGSNR_MAX - LOGSNR_MIN)), "eps"),
    "rf": lambda: parameterization_of("rectified_flow"),
}


class GaussianModel:
    """The exact model for one objective; `traces` counts Python calls, i.e. traces under jit."""

    def __init__(self, objective):
        self.objective = objective
        self.traces = 0

    def __call__(self, x, t):
        self.traces += 1
        a, s = (c[:, None] for c in COEFFICIENTS[self.objective](t))
        x0 = posterior_x0(x, a, s)
        eps = (x - a * x0) / s
        if self.objective == "v":
            return a * eps - s * x0
        if self.objective == "rf":
            return eps - x0
        return eps


def denoiser_for(objective):
    model = GaussianModel(objective)
    return make_denoiser(model, PARAMETERIZATIONS[objective]()), model


def flow_then_denoise(x_start, a0, s0, sigma_last):
    """Exact ODE from level (a0, s0) down to σ-space level sigma_last, then the exact denoise there (every sampler
    here ends with x = D(x, σ_last) on its step to 0)."""
    x_last = MU + np.sqrt(S**2 + sigma_last**2) * (np.asarray(x_start, np.float64) - a0 * MU) / math.hypot(a0 * S, s0)
    return MU + S**2 / (S**2 + sigma_last**2) * (x_last - MU)


def moments(x):
    x = np.asarray(x, np.float64)
    return abs(x.mean() - MU), abs(x.var() / S**2 - 1.0)


def start_noise(seed=1):
    return jax.random.normal(jax.random.key(seed), SHAPE)


# ---- the adapter ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", sorted(COEFFICIENTS))
def test_adapter_gives_exact_sigma_space_denoiser(objective):
    denoise, _ = denoiser_for(objective)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)) * 10, jnp.float32)
    sigma = jnp.asarray(np.geomspace(0.02, 80.0, 16), jnp.float32)  # per-sample noise levels
    expected = MU + S**2 / (S**2 + np.asarray(sigma)[:, None] ** 2) * (np.asarray(x) - MU)
    np.testing.assert_allclose(denoise(x, 1.0, sigma), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("objective", ["v", "rf"])
def test_adapter_handles_pure_noise(objective):
    denoise, _ = denoiser_for(objective)
    x = jnp.linspace(-3.0, 3.0, 8).reshape(2, 4)
    np.testing.assert_allclose(denoise(x, 0.0, 1.0), np.full((2, 4), MU), atol=1e-5)


def test_v_adapter_feeds_the_model_like_k_diffusion():
    seen = {}

    def model(x_model, t):
        seen["x"], seen["t"] = x_model, t
        return jnp.zeros_like(x_model)

    x, sigma = jnp.full((3, 2), 2.0), 4.0
    make_denoiser(model, parameterization_of("v"))(x, 1.0, sigma)
    np.testing.assert_allclose(seen["x"], 2.0 / math.sqrt(1 + sigma**2), rtol=1e-6)
    np.testing.assert_allclose(seen["t"], math.atan(sigma) * 2 / math.pi, rtol=1e-6)


def test_parameterization_rejects_mismatched_objective():
    with pytest.raises(ConfigError):
        Parameterization(LinearInterpolant(), "v")
    with pytest.raises(ConfigError):
        Parameterization(CosineInterpolant(), "velocity")
    with pytest.raises(ConfigError, match="config.objective.name"):
        make_objective({"name": "edm"})
    assert parameterization_of("rf_denoiser").prediction == "velocity"


# ---- DDPM ----------------------------------------------------------------------------------------------------

def test_ddpm_posterior_matches_closed_form():
    rng = np.random.default_rng(0)
    x_t, x0, eps = (rng.normal(size=(4, 5)) for _ in range(3))
    alphas_cumprod = np.cumprod(1.0 - BETAS)
    for t in (0, 1, 250, 999):
        prev = alphas_cumprod[t - 1] if t > 0 else 1.0
        mean = (np.sqrt(prev) * BETAS[t] / (1 - alphas_cumprod[t]) * x0
                + np.sqrt(1 - BETAS[t]) * (1 - prev) / (1 - alphas_cumprod[t]) * x_t)
        variance = (1 - prev) / (1 - alphas_cumprod[t]) * BETAS[t]
        got_mean, got_variance = ddpm_posterior(jnp.asarray(x_t, jnp.float32), jnp.asarray(x0, jnp.float32), t, BETAS)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_variance, variance, rtol=1e-5, atol=1e-12)
        # Ho et al. Algorithm 2 writes the same mean with ε̂ instead of x̂0.
        x0_from_eps = (x_t - np.sqrt(1 - alphas_cumprod[t]) * eps) / np.sqrt(alphas_cumprod[t])
        algorithm_2 = (x_t - BETAS[t] / np.sqrt(1 - alphas_cumprod[t]) * eps) / np.sqrt(1 - BETAS[t])
        got_mean, _ = ddpm_posterior(jnp.asarray(x_t, jnp.float32), jnp.asarray(x0_from_eps, jnp.float32), t, BETAS)
        np.testing.assert_allclose(got_mean, algorithm_2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_ancestral_matches_data_distribution(variance):
    denoise, model = denoiser_for("eps_discrete")
    run = jax.jit(lambda x, key: sample_ddpm(denoise, x, BETAS, key, variance=variance))
    mean_error, var_error = moments(run(start_noise(), jax.random.key(2)))
    assert model.traces == 1
    assert mean_error < 0.01 and var_error < 0.03, (mean_error, var_error)


# ---- deterministic samplers against the exact flow ------------------------------------------------------------

# First-order samplers get 200 steps and second-order ones 50, for comparable accuracy.
KARRAS, KARRAS_FINE = karras_sigmas(50, 0.02, 80.0), karras_sigmas(200, 0.02, 80.0)
POLY = polyexponential_sigmas(50, 0.02, 80.0)
COSINE = cosine_grid(200)
DISCRETE = discrete_grid(BETAS, 200)
RF_TIMES = rf_logsnr_times(200)

ODE_CASES = {
    # name: (objective, run(denoise, x_start, key), grid levels (alpha, sigma), max |error| vs the exact flow)
    "ddim-cosine-v": ("v", lambda d, x, k: sample_ddim(d, x, COSINE, k), COSINE, 0.03),
    "ddim-discrete-eps": ("eps_discrete", lambda d, x, k: sample_ddim(d, x, DISCRETE, k), DISCRETE, 0.05),
    "euler-karras-v": ("v", lambda d, x, k: sample_euler(d, x, KARRAS_FINE, k), ve_grid(KARRAS_FINE), 0.06),
    "heun-karras-v": ("v", lambda d, x, k: sample_euler(d, x, KARRAS, k, heun=True), ve_grid(KARRAS), 0.02),
    "heun-karras-eps-discrete": ("eps_discrete", lambda d, x, k: sample_euler(d, x, KARRAS, k, heun=True),
                                 ve_grid(KARRAS), 0.02),
    "dpmpp-2m-rf": ("rf", lambda d, x, k: sample_dpmpp_2m(d, x, POLY, k), ve_grid(POLY), 0.008),
    "dpmpp-2m-eps-logsnr": ("eps_logsnr", lambda d, x, k: sample_dpmpp_2m(d, x, POLY, k), ve_grid(POLY), 0.008),
    "dpmpp-3m-eta0-v": ("v", lambda d, x, k: sample_dpmpp_3m_sde(d, x, POLY, k, eta=0.0), ve_grid(POLY), 0.004),
    "rf-euler-rf": ("rf", lambda d, x, k: sample_rf_euler(d, x, RF_TIMES, k), (1.0 - RF_TIMES, RF_TIMES), 0.04),
    "rf-euler-v": ("v", lambda d, x, k: sample_rf_euler(d, x, RF_TIMES, k), (1.0 - RF_TIMES, RF_TIMES), 0.04),
}


@pytest.mark.parametrize("case", sorted(ODE_CASES))
def test_ode_sampler_follows_exact_flow(case):
    objective, run, levels, tolerance = ODE_CASES[case]
    alphas, sigmas = (np.asarray(level, np.float64) for level in levels)
    denoise, model = denoiser_for(objective)
    x_start = alphas[0] * MU + math.hypot(alphas[0] * S, sigmas[0]) * start_noise()  # the exact marginal
    out = np.asarray(jax.jit(lambda x, key: run(denoise, x, key))(x_start, jax.random.key(0)))
    sigma_last = sigmas[-2] / alphas[-2]
    expected = flow_then_denoise(x_start, alphas[0], sigmas[0], sigma_last)
    max_error = np.abs(out - expected).max()
    assert max_error < tolerance, max_error
    assert abs(out.mean() - MU) < 0.01
    assert abs(out.var() / (S**4 / (S**2 + sigma_last**2)) - 1.0) < 0.04, out.var()
    assert model.traces == (2 if "heun" in case else 1)


ORDER_CASES = {
    # name: (run(denoise, x_start, key, steps), grid(steps) as (alpha, sigma), order of accuracy)
    "euler": (lambda d, x, k, n: sample_euler(d, x, karras_sigmas(n, 0.02, 80.0), k),
              lambda n: ve_grid(karras_sigmas(n, 0.02, 80.0)), 1),
    "ddim": (lambda d, x, k, n: sample_ddim(d, x, cosine_grid(n), k), cosine_grid, 1),
    "rf-euler": (lambda d, x, k, n: sample_rf_euler(d, x, rf_logsnr_times(n), k),
                 lambda n: (1.0 - rf_logsnr_times(n), rf_logsnr_times(n)), 1),
    "heun": (lambda d, x, k, n: sample_euler(d, x, karras_sigmas(n, 0.02, 80.0), k, heun=True),
             lambda n: ve_grid(karras_sigmas(n, 0.02, 80.0)), 2),
    "dpmpp-2m": (lambda d, x, k, n: sample_dpmpp_2m(d, x, polyexponential_sigmas(n, 0.02, 80.0), k),
                 lambda n: ve_grid(polyexponential_sigmas(n, 0.02, 80.0)), 2),
    "dpmpp-2m-sde-eta0": (lambda d, x, k, n: sample_dpmpp_2m_sde(d, x, polyexponential_sigmas(n, 0.02, 80.0), k,
                                                                 eta=0.0),
                          lambda n: ve_grid(polyexponential_sigmas(n, 0.02, 80.0)), 2),
}


@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_ode_sampler_converges_at_its_order(case):
    """Doubling the steps divides the error against the exact flow by about 2^order."""
    run, grid, order = ORDER_CASES[case]
    denoise, _ = denoiser_for("v")
    errors = []
    for steps in (50, 100):
        alphas, sigmas = (np.asarray(level, np.float64) for level in grid(steps))
        x_start = alphas[0] * MU + math.hypot(alphas[0] * S, sigmas[0]) * start_noise()[:64]
        out = np.asarray(jax.jit(lambda x, key: run(denoise, x, key, steps))(x_start, jax.random.key(0)))
        errors.append(np.abs(out - flow_then_denoise(x_start, alphas[0], sigmas[0], sigmas[-2] / alphas[-2])).max())
    assert 0.8 * 2**order < errors[0] / errors[1] < 1.25 * 2**order, errors


# ---- stochastic samplers ---------------------------------------------------------------------------------------

SDE_CASES = {
    "dpmpp-3m-sde-v": ("v", lambda d, k: sample("dpmpp-3m-sde", d, k, SHAPE, sigma_min=0.01)),
    "dpmpp-3m-sde-eps-logsnr": ("eps_logsnr", lambda d, k: sample("dpmpp-3m-sde", d, k, SHAPE, sigma_min=0.01,
                                                                  sigma_max=100.0)),
    "dpmpp-2m-sde-v": ("v", lambda d, k: sample("dpmpp-2m-sde", d, k, SHAPE, sigma_min=0.01)),
    "ddim-eta1-v": ("v", lambda d, k: sample("ddim", d, k, SHAPE, eta=1.0)),
    "ddim-eta1-rf": ("rf", lambda d, k: sample("ddim", d, k, SHAPE, eta=1.0)),
    "heun-churn-v": ("v", lambda d, k: sample_euler(d, 80.0 * start_noise(), karras_sigmas(100, 0.01, 80.0), k,
                                                    heun=True, s_churn=40.0)),
}


@pytest.mark.parametrize("case", sorted(SDE_CASES))
def test_stochastic_sampler_matches_data_distribution(case):
    objective, run = SDE_CASES[case]
    denoise, model = denoiser_for(objective)
    mean_error, var_error = moments(jax.jit(lambda key: run(denoise, key))(jax.random.key(3)))
    assert mean_error < 0.03 and var_error < 0.08, (mean_error, var_error)
    assert model.traces == (2 if "heun" in case else 1)


def test_dpmpp_3m_sde_with_sao_defaults():
    """100 steps, σ 500 → 0.3, then D(x, 0.3): the exact answer has the variance of E[x0 | x_0.3], S⁴/(S² + 0.09)."""
    denoise, _ = denoiser_for("v")
    out = np.asarray(jax.jit(lambda key: sample("dpmpp-3m-sde", denoise, key, SHAPE))(jax.random.key(4)), np.float64)
    assert abs(out.mean() - MU) < 0.03
    assert abs(out.var() / (S**4 / (S**2 + 0.3**2)) - 1.0) < 0.08, out.var()


def pingpong_moments(steps):
    """Ping-pong with an exact posterior-mean model is not exact. Its moments follow m' = (1−t')·E[x̂0],
    v' = (1−t')²·k²·v + t'², with x̂0 = MU + k(x − aMU), k = aS²/(a²S² + s²), from m = 0, v = 1 at t = 1."""
    times = np.asarray(rf_logsnr_times(steps), np.float64)
    mean, var = 0.0, 1.0
    for t, t_next in zip(times[:-1], times[1:]):
        gain = (1 - t) * S**2 / ((1 - t) ** 2 * S**2 + t**2)
        mean_x0, var_x0 = MU + gain * (mean - (1 - t) * MU), gain**2 * var
        mean, var = (1 - t_next) * mean_x0, (1 - t_next) ** 2 * var_x0 + t_next**2
    return mean, var


def test_seed_determines_the_result():
    denoise, _ = denoiser_for("v")
    run = jax.jit(lambda key: sample("dpmpp-3m-sde", denoise, key, (4, 16), steps=20))
    first, again, other = run(jax.random.key(7)), run(jax.random.key(7)), run(jax.random.key(8))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(other)).min() > 0


# ---- DDIM: deterministic, noise-free, invertible --------------------------------------------------------------

def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    denoise, _ = denoiser_for("v")
    run = jax.jit(lambda x, key, eta: sample_ddim(denoise, x, COSINE, key, eta=eta), static_argnums=2)
    x = start_noise()[:8]
    np.testing.assert_array_equal(run(x, jax.random.key(0), 0.0), run(x, jax.random.key(0), 0.0))
    np.testing.assert_array_equal(run(x, jax.random.key(0), 0.0), run(x, jax.random.key(1), 0.0))
    assert np.abs(np.asarray(run(x, jax.random.key(0), 1.0)) - np.asarray(run(x, jax.random.key(1), 1.0))).max() > 0.1


def test_ddim_inverts_data_to_noise_and_back():
    """Inversion and sampling are both first-order, so they undo each other up to O(1/steps)."""
    denoise, _ = denoiser_for("v")
    grid = cosine_grid(400)
    (a0, a1), (s0, s1) = (np.asarray(grid.alpha, np.float64)[[0, -2]], np.asarray(grid.sigma, np.float64)[[0, -2]])
    x0 = MU + S * np.asarray(start_noise(), np.float64)
    latent = np.asarray(jax.jit(lambda x: ddim_invert(denoise, x, grid))(jnp.asarray(x0, jnp.float32)))
    # x0 stands for the state at the last positive level (a1, s1); the exact flow carries it to (a0, s0).
    exact_latent = a0 * MU + math.hypot(a0 * S, s0) * (x0 - a1 * MU) / math.hypot(a1 * S, s1)
    assert np.abs(latent - exact_latent).max() < 0.02, np.abs(latent - exact_latent).max()
    back = np.asarray(jax.jit(lambda x: sample_ddim(denoise, x, grid, jax.random.key(0)))(latent))
    assert np.abs(back - x0).max() < 0.03, np.abs(back - x0).max()


# ---- classifier-free guidance -----------------------------------------------------------------------------------

class ConditionalModel:
    """A toy conditional model: output = x·gain(ctx) + t + global; `batch_sizes` records the batch of every call."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        gain = 1.0 + jnp.tanh(cond["ctx"]).sum(-1)[:, None, None]
        return x * gain + t[:, None, None] + cond["global"][:, None, :]


def _cfg_inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)  # [B, C, L]
    t = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
    cond = {"ctx": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32), "global": jnp.ones((3, 4), jnp.float32)}
    null = {"ctx": jnp.zeros((1, 6), jnp.float32), "global": cond["global"]}
    return x, t, cond, null


def test_cfg_scale_one_equals_conditional_model_exactly():
    x, t, cond, null = _cfg_inputs()
    model = ConditionalModel()
    conditional = model(x, t, cond)
    np.testing.assert_array_equal(cfg_denoiser(model, cond, null, 1.0)(x, t), conditional)
    # A traced scale selects the conditional half of the doubled batch. That equals the conditional model up to
    # the float effects of compiling it for another batch size (a few ulp).
    traced = jax.jit(lambda scale: cfg_denoiser(model, cond, null, scale, rescale=0.7)(x, t))(jnp.float32(1.0))
    np.testing.assert_allclose(traced, conditional, rtol=2e-6, atol=1e-7)


def test_cfg_batches_both_passes_in_one_call_and_combines():
    x, t, cond, null = _cfg_inputs()
    model = ConditionalModel()
    out = jax.jit(cfg_denoiser(model, cond, null, 6.0))(x, t)
    assert model.batch_sizes == [6]
    c = np.asarray(model(x, t, cond), np.float64)
    u = np.asarray(model(x, t, {"ctx": jnp.zeros((3, 6)), "global": cond["global"]}), np.float64)
    np.testing.assert_allclose(out, u + 6.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_cfg_rescale_matches_lin_et_al():
    x, t, cond, null = _cfg_inputs()
    model = ConditionalModel()
    out = cfg_denoiser(model, cond, null, 4.0, rescale=0.7)(x, t)  # std over channels, axis 1
    c = np.asarray(model(x, t, cond), np.float64)
    u = np.asarray(model(x, t, {"ctx": jnp.zeros((3, 6)), "global": cond["global"]}), np.float64)
    guided = u + 4.0 * (c - u)
    rescaled = guided * c.std(1, keepdims=True) / guided.std(1, keepdims=True)
    np.testing.assert_allclose(out, 0.7 * rescaled + 0.3 * guided, rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_sampling_equals_conditional_sampling():
    model = GaussianModel("v")
    conditional = make_denoiser(model, parameterization_of("v"))
    cond, null = jnp.zeros((4, 1)), jnp.full((4, 1), 5.0)
    guided = make_denoiser(cfg_denoiser(lambda x, t, c: model(x, t) + c, cond, null, 1.0), parameterization_of("v"))
    run = lambda d: jax.jit(lambda key: sample("dpmpp-3m-sde", d, key, (4, 8), steps=10))(jax.random.key(0))
    np.testing.assert_array_equal(run(guided), run(conditional))


# ---- one XLA program per loop ----------------------------------------------------------------------------------

def _contains(eqn, primitive):
    """Whether an equation is `primitive` or holds a sub-jaxpr (a loop or branch body) that contains it."""
    if eqn.primitive.name == primitive:
        return True
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        if any(_contains(inner, primitive) for inner in getattr(sub, "jaxpr", sub).eqns):
            return True
    return False


def _loops_calling(closed_jaxpr, primitive):
    """The top-level equations that contain `primitive`, by primitive name."""
    return [eqn.primitive.name for eqn in closed_jaxpr.jaxpr.eqns if _contains(eqn, primitive)]


@pytest.mark.parametrize("method", SAMPLERS)
def test_each_sampler_is_one_jitted_loop(method):
    calls = []

    def model(x, t):
        calls.append(1)
        return jnp.tanh(x) * t[:, None]  # tanh marks the model inside the jaxpr

    denoise = make_denoiser(model, parameterization_of("ddpm_eps" if method == "ddpm" else "v"))
    extra = {"betas": BETAS[::20]} if method == "ddpm" else {"sigma_max": 80.0, "sigma_min": 0.02}
    fn = jax.jit(lambda key: sample(method, denoise, key, (2, 8), steps=12, **extra))
    fn.lower(jax.random.key(0)).compile()
    assert len(calls) == (2 if method == "heun" else 1)  # traced once per call site, not once per step
    fn(jax.random.key(1))
    fn(jax.random.key(2))
    assert len(calls) == (2 if method == "heun" else 1)  # compiled once
    jaxpr = jax.make_jaxpr(lambda key: sample(method, denoise, key, (2, 8), steps=12, **extra))(jax.random.key(0))
    loops = _loops_calling(jaxpr, "tanh")  # fori_loop with static bounds becomes a scan
    assert len(loops) == 1 and loops[0] in ("scan", "while"), loops


# ---- inpainting and init latents -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ddpm", "ddim", "heun", "dpmpp-2m", "dpmpp-3m-sde", "rf-euler", "pingpong"])
def test_inpainting_keeps_known_region_exactly(method):
    objective = {"ddpm": "eps_discrete", "rf-euler": "rf", "pingpong": "rf"}.get(method, "v")
    denoise, _ = denoiser_for(objective)
    known = jnp.asarray(np.random.default_rng(1).normal(size=(500, 64)) * 3.0, jnp.float32)  # far from the data law
    mask = jnp.zeros((1, 64)).at[:, 32:].set(1.0)  # regenerate the second half of every row
    extra = {"betas": BETAS} if method == "ddpm" else {"sigma_min": 0.01}
    out = np.asarray(jax.jit(lambda key: sample(method, denoise, key, known.shape, steps=40,
                                                inpaint=Inpaint(known, mask), **extra))(jax.random.key(6)))
    np.testing.assert_array_equal(out[:, :32], np.asarray(known)[:, :32])
    if method not in ("pingpong", "rf-euler"):  # biased at 40 steps / few steps, measured in their own tests
        mean_error, var_error = moments(out[:, 32:])
        assert mean_error < 0.03 and var_error < 0.1, (mean_error, var_error)


@pytest.mark.parametrize("method, objective, init_sigma", [("dpmpp-2m", "v", 0.5), ("ddim", "v", 0.3),
                                                           ("rf-euler", "rf", 0.3)])
def test_init_latents_start_at_init_sigma(method, objective, init_sigma):
    """From init + noise at the level (a0, s0) named by init_sigma, the exact flow correlates with init as
    a0·S/√(a0²S² + s0²), and the final denoise at the last positive σ-space level σ_L leaves variance S⁴/(S² + σ_L²)."""
    steps = 30
    if method == "dpmpp-2m":  # σ-space, geometric grid down to sigma_min
        (a0, s0), sigma_last = (1.0, init_sigma), 0.005
    elif method == "ddim":  # t = linspace(init_sigma, 0, steps + 1), alpha = cos, sigma = sin
        (a0, s0), sigma_last = (math.cos(math.pi * init_sigma / 2), math.sin(math.pi * init_sigma / 2)), \
            math.tan(math.pi * init_sigma / steps / 2)
    else:  # log-SNR = linspace(ln((1 − t0)/t0), 2, steps + 1), t = sigmoid(−log-SNR)
        log_snr_last = np.linspace(math.log((1 - init_sigma) / init_sigma), 2.0, steps + 1)[-2]
        (a0, s0), sigma_last = (1.0 - init_sigma, init_sigma), math.exp(-log_snr_last)
    denoise, _ = denoiser_for(objective)
    init = MU + S * start_noise(9)
    out = np.asarray(jax.jit(lambda key: sample(method, denoise, key, SHAPE, steps=steps, sigma_min=0.005, init=init,
                                                init_sigma=init_sigma))(jax.random.key(10)), np.float64)
    correlation = np.corrcoef(out.ravel(), np.asarray(init).ravel())[0, 1]
    assert abs(correlation - a0 * S / math.hypot(a0 * S, s0)) < 0.01, correlation
    assert abs(out.mean() - MU) < 0.01
    assert abs(out.var() / (S**4 / (S**2 + sigma_last**2)) - 1.0) < 0.03, out.var()


def test_sample_rejects_unknown_method_and_bad_arguments():
    denoise, _ = denoiser_for("v")
    with pytest.raises(ConfigError):
        sample("k-lms", denoise, jax.random.key(0), (1, 2))
    with pytest.raises(ConfigError):
        sample("ddpm", denoise, jax.random.key(0), (1, 2))
    with pytest.raises(ConfigError):
        sample("euler", denoise, jax.random.key(0), (1, 2), init_sigma=1.0)
    with pytest.raises(ConfigError):
        sample("ddpm", denoise, jax.random.key(0), (1, 2), betas=BETAS, init=jnp.zeros((1, 2)))


# ---- model time: the training convention, sampled by every compatible sampler ---------------------------------

# α, σ of x = α·x0 + σ·ε at the model time τ the *training loss* feeds each objective's model (written here from
# the objectives' definitions, not from musicdiff's code): v and rectified flow see t itself, a DDPM ε-model sees
# n/(T − 1) at step n.
TRAINING_CONVENTION = {
    "v": COEFFICIENTS["v"],
    "rectified_flow": COEFFICIENTS["rf"],
    "rf_denoiser": COEFFICIENTS["rf"],
    "ddpm_eps": _discrete_coefficients,
}
PREDICTS = {"v": "v", "rectified_flow": "velocity", "rf_denoiser": "velocity", "ddpm_eps": "eps"}


def training_convention_model(objective):
    """The exact model of an objective as its training teaches it: (x_t, τ) -> its regression target."""

    def model(x, tau):
        a, s = (c[:, None] for c in TRAINING_CONVENTION[objective](tau))
        x0 = posterior_x0(x, a, s)
        eps = (x - a * x0) / s
        return {"v": a * eps - s * x0, "velocity": eps - x0, "eps": eps}[PREDICTS[objective]]

    return model


STEPS = 250  # first-order samplers are O(1/steps) off the exact flow
# The σ-space level (σ = s/a) each sampler's last denoise runs at, at STEPS steps and sigma_min 0.01: its output law
# is that of E[x0 | x_σ], N(MU, S⁴/(S² + σ²)) (the rectified-flow samplers stop at the reference's log-SNR 2).
FINAL_SIGMA = {"ddpm": math.sqrt(BETAS[0] / (1 - BETAS[0])), "ddim": math.tan(math.pi / (2 * STEPS)),
               "rf-euler": math.exp(-2.0)}


@pytest.mark.parametrize("objective, method", [(o, m) for o in sorted(TRAINING_CONVENTION) for m in SAMPLERS
                                               if m != "pingpong" and (SAMPLERS[m].objectives is None
                                                                       or o in SAMPLERS[m].objectives)])
def test_every_objective_is_sampled_at_its_training_time(objective, method):
    """The whole path (objective registry -> parameterisation -> sampler registry with its defaults) draws the
    sampler's exact output law from a model written in the training convention (data N(0.5, 0.7²)): mean and std
    within 2%. Ping-pong re-noises its posterior-mean estimate, which is biased for an exact model by design: its
    closed-form recursion is checked below for every objective instead."""
    assert set(TRAINING_CONVENTION) == set(OBJECTIVES)  # a new objective needs its row here
    training = make_objective({"name": objective})
    denoise = make_denoiser(training_convention_model(objective), training.parameterization)
    out = jax.jit(lambda key: sample(method, denoise, key, SHAPE, steps=STEPS, sigma_min=0.01, betas=training.betas,
                                     max_sigma=training.parameterization.interpolant.max_sigma))(jax.random.key(11))
    out = np.asarray(out, np.float64)
    std = S**2 / math.hypot(S, FINAL_SIGMA.get(method, 0.01))
    assert abs(out.mean() / MU - 1.0) < 0.02 and abs(out.std() / std - 1.0) < 0.02, (out.mean(), out.std(), std)


@pytest.mark.parametrize("objective", sorted(TRAINING_CONVENTION))
def test_pingpong_follows_its_recursion_for_every_objective(objective):
    training = make_objective({"name": objective})
    denoise = make_denoiser(training_convention_model(objective), training.parameterization)
    out = np.asarray(jax.jit(lambda key: sample("pingpong", denoise, key, SHAPE, steps=8))(jax.random.key(5)))
    mean, var = pingpong_moments(8)
    assert abs(out.mean() - mean) < 0.01 and abs(out.var() / var - 1.0) < 0.03, (out.mean(), mean, out.var(), var)


def test_training_and_sampling_feed_the_model_the_same_time():
    """At the training noise level of t, the parameterisation adapter calls the model with objective.model_time(t)."""
    t = jnp.asarray([0.0, 0.1, 0.37, 0.5, 0.81, 0.999], jnp.float32)
    for name in OBJECTIVES:
        training = make_objective({"name": name})
        alpha, sigma = training.alpha_sigma(t)
        seen = {}

        def model(x, tau):
            seen["tau"] = tau
            return jnp.zeros_like(x)

        make_denoiser(model, training.parameterization)(jnp.ones((6, 3)), alpha, sigma)
        np.testing.assert_allclose(seen["tau"], training.model_time(t), atol=2e-4, err_msg=name)


def test_sampler_registry_refuses_incompatible_objectives():
    assert check_compatible("ddpm", "ddpm_eps").name == "ddpm"
    with pytest.raises(ConfigError, match="ddpm_eps"):
        check_compatible("ddpm", "v")
    with pytest.raises(ConfigError, match="must be one of"):
        check_compatible("k-lms", "v")

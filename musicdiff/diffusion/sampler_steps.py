"""Sampler loops. Each loop is one `lax.fori_loop`, so a whole generation lowers to one XLA while-loop.

Every loop takes an x0-denoiser `denoise(x, alpha, sigma)` (parameterization.make_denoiser), a starting state x in the
loop's own noise grid, and a PRNG key. Step i draws its noise from `fold_in(key, i)`, so the seed alone fixes the
result. With an `Inpaint`, the known region is overwritten after every step by the known latents noised to the new
level (RePaint without resampling). The last level is clean, so the known region ends exactly equal to `known`.

Grids run from the noisiest level to a clean last level:
- k-diffusion family (euler, heun, dpmpp_*): `sigmas`, σ-space x = x0 + σε, last entry 0;
- DDIM: a `NoiseGrid` (alpha, sigma) of any interpolant, last entry (1, 0);
- rectified flow (rf_euler, pingpong): times t, x = (1 − t)x0 + tε, last entry 0;
- DDPM: the β schedule itself.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from musicdiff.diffusion.parameterization import Denoiser


class NoiseGrid(NamedTuple):
    """Levels of an interpolant x = alpha·x0 + sigma·ε, noisiest first, ending at (1, 0)."""

    alpha: jax.Array
    sigma: jax.Array


class Inpaint(NamedTuple):
    """Known clean latents and where to regenerate: mask 1 = regenerate, 0 = keep `known` (broadcasts to x)."""

    known: jax.Array
    mask: jax.Array


def merge_known(x: jax.Array, inpaint: Inpaint | None, alpha, sigma, key: jax.Array) -> jax.Array:
    """x with its known region replaced by alpha·known + sigma·z (fresh z). mask·x + (1 − mask)·noised keeps both
    sides bit-exact for a 0/1 mask."""
    if inpaint is None:
        return x
    noised = alpha * inpaint.known + sigma * jax.random.normal(key, x.shape, x.dtype)
    mask = jnp.asarray(inpaint.mask, x.dtype)
    return mask * x + (1.0 - mask) * noised


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(noise key for the sampler's own noise, key for re-noising the known region)."""
    noise_key, inpaint_key = jax.random.split(key)
    return noise_key, inpaint_key


def _normal(key: jax.Array, step, x: jax.Array) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(key, step), x.shape, x.dtype)


def _inpaint_start(x, inpaint, alpha, sigma, inpaint_key):
    return merge_known(x, inpaint, alpha, sigma, jax.random.fold_in(inpaint_key, 0))


def _inpaint_step(x, inpaint, alpha, sigma, inpaint_key, i):
    return merge_known(x, inpaint, alpha, sigma, jax.random.fold_in(inpaint_key, i + 1))


# ---- DDPM (Ho et al. 2020, Algorithm 2) ----------------------------------------------------------------------------

def ddpm_coefficients(betas) -> dict[str, jax.Array]:
    """Per-timestep coefficients in float64 on the host, stored as float32 (the β schedule must be concrete)."""
    betas = np.asarray(betas, np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    tables = {
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_alphas_cumprod_prev": np.sqrt(alphas_cumprod_prev),
        "sqrt_one_minus_alphas_cumprod_prev": np.sqrt(1.0 - alphas_cumprod_prev),
        "mean_x0_coef": np.sqrt(alphas_cumprod_prev) * betas / (1.0 - alphas_cumprod),
        "mean_xt_coef": np.sqrt(1.0 - betas) * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "betas": betas,
    }
    return {name: jnp.asarray(value, jnp.float32) for name, value in tables.items()}


def ddpm_posterior(x_t: jax.Array, x0_hat: jax.Array, t, betas) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of q(x_{t−1} | x_t, x0 = x0_hat) for integer t (0-based; at t = 0 the variance is 0).

    mean = √ᾱ_{t−1}·β_t/(1 − ᾱ_t)·x0 + √α_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t, var = β_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t).
    """
    tables = ddpm_coefficients(betas)
    mean = tables["mean_x0_coef"][t] * x0_hat + tables["mean_xt_coef"][t] * x_t
    return mean, tables["posterior_variance"][t]


def sample_ddpm(denoise: Denoiser, x: jax.Array, betas, key: jax.Array, *, variance: str = "posterior",
                inpaint: Inpaint | None = None) -> jax.Array:
    """Ancestral sampling over all T = len(betas) steps, from x ≈ x_{T−1} (variance-preserving, ~N(0, I)).

    variance "posterior" uses β̃_t (the posterior variance), "beta" uses β_t. Both are Ho et al.'s choices. With an
    ε-model this is Algorithm 2 exactly: the posterior mean at x0 = (x_t − √(1−ᾱ_t)ε̂)/√ᾱ_t equals
    (x_t − β_t/√(1−ᾱ_t)·ε̂)/√α_t.
    """
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance={variance!r}: use 'posterior' or 'beta'")
    tables = ddpm_coefficients(betas)
    num_steps = tables["betas"].shape[0]
    noise_key, inpaint_key = _split(key)
    step_variance = tables["posterior_variance"] if variance == "posterior" else tables["betas"]
    x = _inpaint_start(x, inpaint, tables["sqrt_alphas_cumprod"][-1], tables["sqrt_one_minus_alphas_cumprod"][-1],
                       inpaint_key)

    def body(i, x):
        t = num_steps - 1 - i
        x0_hat = denoise(x, tables["sqrt_alphas_cumprod"][t], tables["sqrt_one_minus_alphas_cumprod"][t])
        mean = tables["mean_x0_coef"][t] * x0_hat + tables["mean_xt_coef"][t] * x
        std = jnp.where(t > 0, jnp.sqrt(step_variance[t]), 0.0)  # Algorithm 2: no noise on the last step
        x = mean + std * _normal(noise_key, i, x)
        return _inpaint_step(x, inpaint, tables["sqrt_alphas_cumprod_prev"][t],
                             tables["sqrt_one_minus_alphas_cumprod_prev"][t], inpaint_key, i)

    return lax.fori_loop(0, num_steps, body, x)


# ---- DDIM (Song et al. 2021), on any interpolant ---------------------------------------------------------------

def _ddim_update(x, x0_hat, alpha, sigma, alpha_next, sigma_next, eta, noise):
    """x_next = a'·x̂0 + √(s'² − c²)·ε̂ + c·z, with c = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ') in variance-preserving units,
    scaled by the next level's norm √(a'² + s'²)."""
    eps_hat = (x - alpha * x0_hat) / sigma
    if noise is None:
        return alpha_next * x0_hat + sigma_next * eps_hat
    abar = alpha**2 / (alpha**2 + sigma**2)
    abar_next = alpha_next**2 / (alpha_next**2 + sigma_next**2)
    c = eta * jnp.sqrt((1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next))
    c = c * jnp.hypot(alpha_next, sigma_next)
    return alpha_next * x0_hat + jnp.sqrt(jnp.maximum(sigma_next**2 - c**2, 0.0)) * eps_hat + c * noise


def sample_ddim(denoise: Denoiser, x: jax.Array, grid: NoiseGrid, key: jax.Array, *, eta: float = 0.0,
                inpaint: Inpaint | None = None) -> jax.Array:
    """DDIM on grid levels (alpha_i, sigma_i). With η = 0 it is deterministic and draws no noise (key only feeds the
    inpainting). η = 1 is DDPM-like ancestral sampling. The last step returns x̂0, as the reference's v-DDIM does."""
    noise_key, inpaint_key = _split(key)
    x = _inpaint_start(x, inpaint, grid.alpha[0], grid.sigma[0], inpaint_key)

    def body(i, x):
        alpha, sigma, alpha_next, sigma_next = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        x0_hat = denoise(x, alpha, sigma)
        noise = _normal(noise_key, i, x) if eta else None
        x = _ddim_update(x, x0_hat, alpha, sigma, alpha_next, sigma_next, eta, noise)
        return _inpaint_step(x, inpaint, alpha_next, sigma_next, inpaint_key, i)

    return lax.fori_loop(0, grid.alpha.shape[0] - 1, body, x)


def ddim_invert(denoise: Denoiser, x: jax.Array, grid: NoiseGrid) -> jax.Array:
    """Runs the η = 0 DDIM ODE upwards. It maps a state at the grid's smallest positive level (grid[-2]) to one at
    grid[0], each step using the model at its lower level. x0 itself can be passed where that level is small."""
    last = grid.alpha.shape[0] - 2

    def body(j, x):
        i = last - j
        x0_hat = denoise(x, grid.alpha[i], grid.sigma[i])
        return _ddim_update(x, x0_hat, grid.alpha[i], grid.sigma[i], grid.alpha[i - 1], grid.sigma[i - 1], 0.0, None)

    return lax.fori_loop(0, last, body, x)


# ---- k-diffusion family in σ-space: x = x0 + σε --------------------------------------------------------------

def sample_euler(denoise: Denoiser, x: jax.Array, sigmas: jax.Array, key: jax.Array, *, heun: bool = False,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                 inpaint: Inpaint | None = None) -> jax.Array:
    """Karras et al. (2022) Algorithm 2 on dx/dσ = (x − D(x, σ))/σ: Euler, or Heun with `heun=True` (2nd order,
    Euler on the last step to σ = 0). s_churn > 0 adds Karras' stochastic churn; 0 keeps the ODE deterministic."""
    noise_key, inpaint_key = _split(key)
    num_steps = sigmas.shape[0] - 1
    gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
    x = _inpaint_start(x, inpaint, 1.0, sigmas[0], inpaint_key)

    def body(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if s_churn > 0:
            gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
            sigma_hat = sigma * (1.0 + gamma)
            x = x + jnp.sqrt(sigma_hat**2 - sigma**2) * s_noise * _normal(noise_key, i, x)
        else:
            sigma_hat = sigma
        slope = (x - denoise(x, 1.0, sigma_hat)) / sigma_hat
        dt = sigma_next - sigma_hat
        x_euler = x + slope * dt
        if heun:
            def corrected(x_euler):
                slope_next = (x_euler - denoise(x_euler, 1.0, sigma_next)) / sigma_next
                return x + 0.5 * (slope + slope_next) * dt

            # lax.cond skips the second model call on the last step, where σ_next = 0.
            x_euler = lax.cond(sigma_next > 0, corrected, lambda x_euler: x_euler, x_euler)
        return _inpaint_step(x_euler, inpaint, 1.0, sigma_next, inpaint_key, i)

    return lax.fori_loop(0, num_steps, body, x)


def sample_dpmpp_2m(denoise: Denoiser, x: jax.Array, sigmas: jax.Array, key: jax.Array, *,
                    inpaint: Inpaint | None = None) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) in σ-space with λ = −log σ, h = λ' − λ:
    x' = (σ'/σ)·x − (e^{−h} − 1)·D̄, D̄ = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1}, r = h_{i−1}/h. First order on the first
    step and on the last one (σ' = 0, where x' = D)."""
    _, inpaint_key = _split(key)
    x = _inpaint_start(x, inpaint, 1.0, sigmas[0], inpaint_key)

    def body(i, carry):
        x, previous_denoised, previous_h = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, 1.0, sigma)
        h = jnp.log(sigma) - jnp.log(sigma_next)
        r = previous_h / h
        second_order = (1.0 + 0.5 / r) * denoised - (0.5 / r) * previous_denoised
        combined = jnp.where((i > 0) & (sigma_next > 0), second_order, denoised)
        x_next = jnp.where(sigma_next > 0, (sigma_next / sigma) * x - jnp.expm1(-h) * combined, denoised)
        x_next = _inpaint_step(x_next, inpaint, 1.0, sigma_next, inpaint_key, i)
        return x_next, denoised, h

    x, _, _ = lax.fori_loop(0, sigmas.shape[0] - 1, body, (x, jnp.zeros_like(x), jnp.ones((), jnp.float32)))
    return x


def sample_dpmpp_2m_sde(denoise: Denoiser, x: jax.Array, sigmas: jax.Array, key: jax.Array, *, eta: float = 1.0,
                        s_noise: float = 1.0, inpaint: Inpaint | None = None) -> jax.Array:
    """DPM-Solver++(2M) SDE, midpoint variant (the reference's `sample_k` default), i.i.d. Gaussian noise per step:
    x' = e^{−(1+η)h}·x + (1 − e^{−(1+η)h})·D + ½(1 − e^{−(1+η)h})·(D − D_prev)/r + σ'·√(1 − e^{−2ηh})·z."""
    noise_key, inpaint_key = _split(key)
    x = _inpaint_start(x, inpaint, 1.0, sigmas[0], inpaint_key)

    def body(i, carry):
        x, previous_denoised, previous_h = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, 1.0, sigma)
        h = jnp.log(sigma) - jnp.log(sigma_next)
        h_eta = h * (1.0 + eta)
        weight = -jnp.expm1(-h_eta)
        x_sde = jnp.exp(-h_eta) * x + weight * denoised
        correction = 0.5 * weight * (denoised - previous_denoised) / (previous_h / h)
        x_sde = jnp.where(i > 0, x_sde + correction, x_sde)
        if eta:
            x_sde = x_sde + sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)) * s_noise * _normal(noise_key, i, x)
        x_next = jnp.where(sigma_next > 0, x_sde, denoised)
        x_next = _inpaint_step(x_next, inpaint, 1.0, sigma_next, inpaint_key, i)
        return x_next, denoised, h

    x, _, _ = lax.fori_loop(0, sigmas.shape[0] - 1, body, (x, jnp.zeros_like(x), jnp.ones((), jnp.float32)))
    return x


def sample_dpmpp_3m_sde(denoise: Denoiser, x: jax.Array, sigmas: jax.Array, key: jax.Array, *, eta: float = 1.0,
                        s_noise: float = 1.0, inpaint: Inpaint | None = None) -> jax.Array:
    """DPM-Solver++(3M) SDE as k-diffusion runs it for SAO (spec §4.1), with i.i.d. Gaussian noise instead of the
    reference's Brownian tree (statistically equivalent). h_η = (1+η)h; x' = e^{−h_η}x + (1 − e^{−h_η})D, then the
    2nd/3rd-order corrections φ2·D1 − φ3·D2 from the last two denoised values, then σ'·√(1 − e^{−2ηh})·z."""
    noise_key, inpaint_key = _split(key)
    x = _inpaint_start(x, inpaint, 1.0, sigmas[0], inpaint_key)

    def body(i, carry):
        x, denoised_1, denoised_2, h_1, h_2 = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, 1.0, sigma)
        h = jnp.log(sigma) - jnp.log(sigma_next)
        h_eta = h * (1.0 + eta)
        x_sde = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * denoised
        phi_2 = jnp.expm1(-h_eta) / h_eta + 1.0
        phi_3 = phi_2 / h_eta - 0.5
        r0, r1 = h_1 / h, h_2 / h
        delta_0 = (denoised - denoised_1) / r0
        delta_1 = (denoised_1 - denoised_2) / r1
        d1_third = delta_0 + (delta_0 - delta_1) * r0 / (r0 + r1)
        d2_third = (delta_0 - delta_1) / (r0 + r1)
        third = x_sde + phi_2 * d1_third - phi_3 * d2_third
        second = x_sde + phi_2 * delta_0
        x_sde = jnp.where(i >= 2, third, jnp.where(i == 1, second, x_sde))
        if eta:
            x_sde = x_sde + sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)) * s_noise * _normal(noise_key, i, x)
        x_next = jnp.where(sigma_next > 0, x_sde, denoised)
        x_next = _inpaint_step(x_next, inpaint, 1.0, sigma_next, inpaint_key, i)
        return x_next, denoised, denoised_1, h, h_1

    zeros = jnp.zeros_like(x)
    one = jnp.ones((), jnp.float32)
    x, *_ = lax.fori_loop(0, sigmas.shape[0] - 1, body, (x, zeros, zeros, one, one))
    return x


# ---- rectified flow: x = (1 − t)x0 + tε -------------------------------------------------------------------------

def sample_rf_euler(denoise: Denoiser, x: jax.Array, times: jax.Array, key: jax.Array, *,
                    inpaint: Inpaint | None = None) -> jax.Array:
    """Euler on dx/dt = v̂ = (x − x̂0)/t from times[0] (≤ 1) to 0: x' = x + (t' − t)·v̂."""
    _, inpaint_key = _split(key)
    x = _inpaint_start(x, inpaint, 1.0 - times[0], times[0], inpaint_key)

    def body(i, x):
        t, t_next = times[i], times[i + 1]
        velocity = (x - denoise(x, 1.0 - t, t)) / t
        x = x + (t_next - t) * velocity
        return _inpaint_step(x, inpaint, 1.0 - t_next, t_next, inpaint_key, i)

    return lax.fori_loop(0, times.shape[0] - 1, body, x)


def sample_pingpong(denoise: Denoiser, x: jax.Array, times: jax.Array, key: jax.Array, *,
                    inpaint: Inpaint | None = None) -> jax.Array:
    """Ping-pong (few-step, for rf_denoiser / ARC models): x̂0 = D(x, t), then x' = (1 − t')·x̂0 + t'·z with fresh z."""
    noise_key, inpaint_key = _split(key)
    x = _inpaint_start(x, inpaint, 1.0 - times[0], times[0], inpaint_key)

    def body(i, x):
        t, t_next = times[i], times[i + 1]
        x0_hat = denoise(x, 1.0 - t, t)
        x = (1.0 - t_next) * x0_hat + t_next * _normal(noise_key, i, x)
        return _inpaint_step(x, inpaint, 1.0 - t_next, t_next, inpaint_key, i)

    return lax.fori_loop(0, times.shape[0] - 1, body, x)

"""Sampling: noise grids, the `sample` entry point, and the sampler loops (re-exported from sampler_steps).

Usage, for a v-model `model_fn(x_model, t, cond)`:

    model = cfg_denoiser(model_fn, cond, null_cond, scale=7.0)
    denoise = make_denoiser(model, v_parameterization())
    latents = jax.jit(lambda key: sample("dpmpp-3m-sde", denoise, key, (B, L, C)))(key)

The SAO defaults follow spec §4: DPM++ 3M SDE, 100 steps, σ from 500 down to 0.3 on a geometric grid
(polyexponential, ρ = 1), then a final step to 0. Rectified-flow samplers clamp σ_max to t ≤ 1 and use the
reference's log-SNR time grid (§4.2). v-DDIM uses t = linspace(t_max, 0) (§4.1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from musicdiff.diffusion.parameterization import Denoiser
from musicdiff.diffusion.sampler_steps import (
    Inpaint,
    NoiseGrid,
    ddpm_coefficients,
    ddim_invert,
    ddpm_posterior,
    merge_known,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_pingpong,
    sample_rf_euler,
)
from musicdiff.errors import ConfigError

__all__ = [
    "Inpaint", "NoiseGrid", "SAMPLERS", "cosine_grid", "ddim_invert", "ddpm_posterior", "discrete_grid",
    "karras_sigmas", "merge_known", "polyexponential_sigmas", "rf_linear_times", "rf_logsnr_times", "sample",
    "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler",
    "sample_pingpong", "sample_rf_euler", "ve_grid",
]

SIGMA_SAMPLERS = ("euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m-sde")
RF_SAMPLERS = ("rf-euler", "pingpong")
SAMPLERS = ("ddpm", "ddim", *SIGMA_SAMPLERS, *RF_SAMPLERS)


# ---- grids -----------------------------------------------------------------------------------------------------

def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> jax.Array:
    """k-diffusion's grid: σ_i = exp(ramp_i^ρ·(ln σ_max − ln σ_min) + ln σ_min), ramp = linspace(1, 0, steps), then 0.
    ρ = 1 is geometric spacing (SAO)."""
    ramp = jnp.linspace(1.0, 0.0, steps) ** rho
    log_min, log_max = jnp.log(jnp.float32(sigma_min)), jnp.log(jnp.float32(sigma_max))
    return jnp.append(jnp.exp(ramp * (log_max - log_min) + log_min), 0.0).astype(jnp.float32)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> jax.Array:
    """Karras et al. (2022) eq. 5: σ_i = (σ_max^{1/ρ} + i/(steps−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then 0."""
    ramp = jnp.linspace(0.0, 1.0, steps)
    inv_min, inv_max = jnp.float32(sigma_min) ** (1.0 / rho), jnp.float32(sigma_max) ** (1.0 / rho)
    return jnp.append((inv_max + ramp * (inv_min - inv_max)) ** rho, 0.0).astype(jnp.float32)


def ve_grid(sigmas: jax.Array) -> NoiseGrid:
    """σ-space levels (x = x0 + σε) as a NoiseGrid, so DDIM can run on a k-diffusion grid."""
    return NoiseGrid(jnp.ones_like(sigmas), sigmas)


def cosine_grid(steps: int, t_max: float = 1.0) -> NoiseGrid:
    """The reference's v-DDIM grid: t = linspace(t_max, 0, steps + 1), alpha = cos(πt/2), sigma = sin(πt/2)."""
    t = jnp.linspace(t_max, 0.0, steps + 1)[:-1]
    # sin(π(1−t)/2) keeps alpha exactly 0 at t = 1. The clean end (1, 0) is appended exactly.
    alpha = jnp.append(jnp.sin(0.5 * math.pi * (1.0 - t)), 1.0)
    sigma = jnp.append(jnp.sin(0.5 * math.pi * t), 0.0)
    return NoiseGrid(alpha.astype(jnp.float32), sigma.astype(jnp.float32))


def discrete_grid(betas, steps: int) -> NoiseGrid:
    """`steps` evenly strided DDPM timesteps from T−1 down to 0, then the clean level: DDIM for discrete ε-models."""
    sqrt_alphas_cumprod = ddpm_coefficients(betas)["sqrt_alphas_cumprod"]
    num_timesteps = sqrt_alphas_cumprod.shape[0]
    index = jnp.round(jnp.linspace(num_timesteps - 1, 0, steps)).astype(jnp.int32)
    alpha = sqrt_alphas_cumprod[index]
    return NoiseGrid(jnp.append(alpha, 1.0), jnp.append(jnp.sqrt(1.0 - alpha**2), 0.0))


def rf_logsnr_times(steps: int, t_max: float = 1.0, logsnr_end: float = 2.0) -> jax.Array:
    """The reference's rectified-flow grid (spec §4.2): log-SNR = linspace(ln((1−t_max)/t_max) or −6 at t_max = 1,
    logsnr_end, steps + 1), t = sigmoid(−log-SNR), with t[0] = t_max and t[−1] = 0."""
    logsnr_start = -6.0 if t_max >= 1.0 else math.log((1.0 - t_max) / t_max)
    times = jax.nn.sigmoid(-jnp.linspace(logsnr_start, logsnr_end, steps + 1))
    return times.at[0].set(t_max).at[-1].set(0.0).astype(jnp.float32)


def rf_linear_times(steps: int, t_max: float = 1.0) -> jax.Array:
    """Uniform rectified-flow times t = linspace(t_max, 0, steps + 1)."""
    return jnp.linspace(t_max, 0.0, steps + 1).astype(jnp.float32)


# ---- entry point -------------------------------------------------------------------------------------------------

def sample(method: str, denoise: Denoiser, key: jax.Array, shape: tuple[int, ...], *, steps: int = 100,
           sigma_min: float = 0.3, sigma_max: float = 500.0, rho: float = 1.0, schedule: str = "polyexponential",
           eta: float | None = None, s_noise: float = 1.0, init: jax.Array | None = None,
           init_sigma: float | None = None, inpaint: Inpaint | None = None, betas=None,
           dtype=jnp.float32) -> jax.Array:
    """Draws samples of `shape` with one of SAMPLERS. Pure JAX: jit it with `method`, `shape` and the grid
    arguments static. The whole loop is one XLA while-loop.

    - σ-space samplers (euler, heun, dpmpp-2m, dpmpp-2m-sde, dpmpp-3m-sde) use a `schedule` grid
      ("polyexponential" with ρ, or "karras") from sigma_max to sigma_min, then 0.
    - ddim uses the cosine grid from t_max = min(sigma_max, 1) (the reference's v-DDIM). η defaults to 0.
    - rf-euler and pingpong use the log-SNR time grid from t_max = min(sigma_max, 1).
    - ddpm runs every step of `betas`. `steps` and the σ arguments do not apply, and neither does init.
    - init (audio-to-audio): start from alpha_0·init + sigma_0·ε at the first level. init_sigma replaces
      sigma_max: it is σ for σ-space samplers and t for ddim/rf, as in the reference.
    - eta: noise scale of the SDE samplers (default 1) and of ddim (default 0). s_noise scales SDE noise.
    """
    if method not in SAMPLERS:
        raise ConfigError(f"sampler_type={method!r}: must be one of {', '.join(SAMPLERS)}")
    if init_sigma is not None:
        if init is None:
            raise ConfigError("init_sigma is set but init is None; pass the init latents to start from")
        sigma_max = init_sigma
    init_given = init is not None
    start_key, loop_key = jax.random.split(key)
    noise = jax.random.normal(start_key, shape, dtype)
    init = jnp.zeros(shape, dtype) if init is None else jnp.broadcast_to(jnp.asarray(init, dtype), shape)

    if method in SIGMA_SAMPLERS:
        if schedule not in ("polyexponential", "karras"):
            raise ConfigError(f"schedule={schedule!r}: must be 'polyexponential' or 'karras'")
        make_sigmas = polyexponential_sigmas if schedule == "polyexponential" else karras_sigmas
        sigmas = make_sigmas(steps, sigma_min, sigma_max, rho)
        x = init + sigmas[0] * noise
        sde_eta = 1.0 if eta is None else eta
        if method in ("euler", "heun"):
            return sample_euler(denoise, x, sigmas, loop_key, heun=method == "heun", inpaint=inpaint)
        if method == "dpmpp-2m":
            return sample_dpmpp_2m(denoise, x, sigmas, loop_key, inpaint=inpaint)
        step_fn = sample_dpmpp_2m_sde if method == "dpmpp-2m-sde" else sample_dpmpp_3m_sde
        return step_fn(denoise, x, sigmas, loop_key, eta=sde_eta, s_noise=s_noise, inpaint=inpaint)

    if method == "ddim":
        grid = cosine_grid(steps, min(float(sigma_max), 1.0))
        x = grid.alpha[0] * init + grid.sigma[0] * noise
        return sample_ddim(denoise, x, grid, loop_key, eta=0.0 if eta is None else eta, inpaint=inpaint)

    if method in RF_SAMPLERS:
        times = rf_logsnr_times(steps, min(float(sigma_max), 1.0))
        x = (1.0 - times[0]) * init + times[0] * noise
        step_fn = sample_rf_euler if method == "rf-euler" else sample_pingpong
        return step_fn(denoise, x, times, loop_key, inpaint=inpaint)

    if betas is None:
        raise ConfigError("sampler_type='ddpm' needs the model's β schedule: pass betas=")
    if init_sigma is not None or init_given:
        raise ConfigError("sampler_type='ddpm' always starts from pure noise; use ddim or a σ-space sampler for init")
    x = ddpm_coefficients(betas)["sqrt_one_minus_alphas_cumprod"][-1] * noise
    return sample_ddpm(denoise, x, betas, loop_key, inpaint=inpaint)

"""Sampling: noise grids, the sampler registry and the `sample` entry point (loops in sampler_steps).

Usage, for a v-model `model_fn(x_model, t, cond)` (latents [B, C, L]):

    objective = make_objective({"name": "v"})
    model = cfg_denoiser(model_fn, cond, null_cond, scale=7.0)
    denoise = make_denoiser(model, objective.parameterization)
    latents = jax.jit(lambda key: sample("dpmpp-3m-sde", denoise, key, (B, C, L)))(key)

Every sampler is a registry entry (`SAMPLERS`, `register_sampler`): name -> its loop, the objectives it accepts
(None: any, through the parameterisation adapter) and its default noise range. The SAO defaults follow spec §4:
DPM++ 3M SDE, 100 steps, σ from 500 down to 0.3 on a geometric grid (polyexponential, ρ = 1), then a final step to 0.
Samplers on a time grid (ddim, rf-euler, pingpong) read σ_max as the starting time and clamp it to t ≤ 1; the
rectified-flow ones use the reference's log-SNR time grid (§4.2), v-DDIM t = linspace(t_max, 0) (§4.1). With a
length-aware `time_shift` (diffusion/time_shift.py, Stable Audio 3) the rectified-flow samplers use its warped uniform
grid at the given effective length instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

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
from musicdiff.diffusion.time_shift import TimeShift, shifted_times
from musicdiff.errors import ConfigError

__all__ = [
    "Inpaint", "NoiseGrid", "SAMPLERS", "SampleOptions", "SamplerSpec", "check_compatible", "cosine_grid",
    "ddim_invert", "ddpm_posterior", "discrete_grid", "karras_sigmas", "merge_known", "polyexponential_sigmas",
    "register_sampler", "rf_logsnr_times", "sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler", "sample_pingpong", "sample_rf_euler",
    "sampler_spec", "ve_grid",
]

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


# ---- the registry -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """What every sampler loop may read: its grid, noise options and inpainting (see `sample`)."""

    steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    schedule: str
    eta: float | None
    s_noise: float
    inpaint: Inpaint | None
    betas: Any
    time_shift: TimeShift | None = None  # rectified-flow samplers: a length-aware grid instead of the log-SNR one
    shift_length: Any = None  # the effective length (latent frames) the shift reads; a scalar, possibly traced


SamplerRun = Callable[[Denoiser, jax.Array, jax.Array, jax.Array, jax.Array, SampleOptions], jax.Array]
"""run(denoise, noise, init, key, options) -> x0: draws from noise (and init latents, zeros when none) to clean."""


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    name: str
    run: SamplerRun
    objectives: tuple[str, ...] | None = None  # the training objectives it accepts; None: any
    sigma_range: tuple[float, float] = (0.3, 500.0)  # default (σ_min, σ_max): SAO's for σ-space samplers
    time_grid: bool = False  # σ_max is a start time t <= 1 (the reference's ddim / rectified-flow samplers)
    starts_from_init: bool = True  # audio-to-audio: can start from noised init latents
    time_shiftable: bool = False  # runs on a rectified-flow time grid that a TimeShift can replace

    def start_level(self, sigma_max: float, max_sigma: float = math.inf) -> float:
        """The first level this sampler runs from: σ_max clamped to the time grid's t <= 1, or to the highest noise
        level the model's schedule knows (`Parameterization.interpolant.max_sigma`)."""
        return min(float(sigma_max), 1.0) if self.time_grid else min(float(sigma_max), max_sigma)


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    SAMPLERS[spec.name] = spec
    return spec


def sampler_spec(name: str, key: str = "config.sampler") -> SamplerSpec:
    if name not in SAMPLERS:
        raise ConfigError(f"{key}={name!r}: must be one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_compatible(name: str, objective: str, key: str = "config.sampler") -> SamplerSpec:
    """The spec of sampler `name`, refusing one that cannot sample a model trained with `objective`."""
    spec = sampler_spec(name, key)
    if spec.objectives is not None and objective not in spec.objectives:
        usable = [n for n, s in SAMPLERS.items() if s.objectives is None or objective in s.objectives]
        raise ConfigError(f"{key}={name!r} samples models trained with {' or '.join(spec.objectives)}; this model "
                          f"was trained with the {objective!r} objective: use one of {', '.join(usable)}")
    return spec


def _sigma_grid(options: SampleOptions) -> jax.Array:
    grids = {"polyexponential": polyexponential_sigmas, "karras": karras_sigmas}
    if options.schedule not in grids:
        raise ConfigError(f"schedule={options.schedule!r}: must be one of {', '.join(grids)}")
    return grids[options.schedule](options.steps, options.sigma_min, options.sigma_max, options.rho)


def _sigma_sampler(loop: Callable[..., jax.Array], stochastic: bool, **fixed: Any) -> SamplerRun:
    """A k-diffusion loop on the σ grid from σ_max to σ_min (then 0); SDE loops take η (default 1) and s_noise."""

    def run(denoise, noise, init, key, options):
        sigmas = _sigma_grid(options)
        extra = dict(eta=1.0 if options.eta is None else options.eta, s_noise=options.s_noise) if stochastic else {}
        return loop(denoise, init + sigmas[0] * noise, sigmas, key, inpaint=options.inpaint, **fixed, **extra)

    return run


def _run_ddim(denoise, noise, init, key, options):
    grid = cosine_grid(options.steps, options.sigma_max)
    return sample_ddim(denoise, grid.alpha[0] * init + grid.sigma[0] * noise, grid, key,
                       eta=0.0 if options.eta is None else options.eta, inpaint=options.inpaint)


def _rf_sampler(loop: Callable[..., jax.Array]) -> SamplerRun:
    def run(denoise, noise, init, key, options):
        if options.time_shift is not None and options.time_shift.active:
            times = shifted_times(options.time_shift, options.steps, options.sigma_max, options.shift_length)
        else:
            times = rf_logsnr_times(options.steps, options.sigma_max)
        return loop(denoise, (1.0 - times[0]) * init + times[0] * noise, times, key, inpaint=options.inpaint)

    return run


def _run_ddpm(denoise, noise, init, key, options):
    if options.betas is None:
        raise ConfigError("sampler 'ddpm' needs the model's β schedule: pass betas=")
    x = ddpm_coefficients(options.betas)["sqrt_one_minus_alphas_cumprod"][-1] * noise
    return sample_ddpm(denoise, x, options.betas, key, inpaint=options.inpaint)


register_sampler(SamplerSpec("ddpm", _run_ddpm, objectives=("ddpm_eps",), starts_from_init=False))
register_sampler(SamplerSpec("ddim", _run_ddim, sigma_range=(0.0, 1.0), time_grid=True))
register_sampler(SamplerSpec("euler", _sigma_sampler(sample_euler, False)))
register_sampler(SamplerSpec("heun", _sigma_sampler(sample_euler, False, heun=True)))
register_sampler(SamplerSpec("dpmpp-2m", _sigma_sampler(sample_dpmpp_2m, False)))
register_sampler(SamplerSpec("dpmpp-2m-sde", _sigma_sampler(sample_dpmpp_2m_sde, True)))
register_sampler(SamplerSpec("dpmpp-3m-sde", _sigma_sampler(sample_dpmpp_3m_sde, True)))
register_sampler(SamplerSpec("rf-euler", _rf_sampler(sample_rf_euler), sigma_range=(0.0, 1.0), time_grid=True,
                             time_shiftable=True))
register_sampler(SamplerSpec("pingpong", _rf_sampler(sample_pingpong), sigma_range=(0.0, 1.0), time_grid=True,
                             time_shiftable=True))


# ---- entry point -------------------------------------------------------------------------------------------------

def sample(method: str, denoise: Denoiser, key: jax.Array, shape: tuple[int, ...], *, steps: int = 100,
           sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 1.0,
           schedule: str = "polyexponential", eta: float | None = None, s_noise: float = 1.0,
           init: jax.Array | None = None, init_sigma: float | None = None, inpaint: Inpaint | None = None,
           betas=None, max_sigma: float = math.inf, time_shift: TimeShift | None = None, shift_length: Any = None,
           dtype=jnp.float32) -> jax.Array:
    """Draws samples of `shape` with the registered sampler `method`. Pure JAX: jit it with `method`, `shape` and
    the grid arguments static. The whole loop is one XLA while-loop.

    - σ-space samplers (euler, heun, dpmpp-2m, dpmpp-2m-sde, dpmpp-3m-sde) use a `schedule` grid
      ("polyexponential" with ρ, or "karras") from sigma_max to sigma_min, then 0.
    - ddim uses the cosine grid from t_max = min(sigma_max, 1) (the reference's v-DDIM). η defaults to 0.
    - rf-euler and pingpong use the log-SNR time grid from t_max = min(sigma_max, 1).
    - ddpm runs every step of `betas`. `steps` and the σ arguments do not apply, and neither does init.
    - sigma_min / sigma_max default to the sampler's `sigma_range`; `max_sigma` (the model schedule's highest
      level) caps σ_max of σ-space samplers.
    - init (audio-to-audio): start from alpha_0·init + sigma_0·ε at the first level. init_sigma replaces
      sigma_max: it is σ for σ-space samplers and t for ddim/rf, as in the reference.
    - eta: noise scale of the SDE samplers (default 1) and of ddim (default 0). s_noise scales SDE noise.
    - time_shift (rf-euler and pingpong only): an active TimeShift replaces the log-SNR grid by its shifted uniform
      grid at effective length `shift_length` (latent frames; one scalar for the whole batch, may be traced).
    """
    spec = sampler_spec(method, "sampler")
    if time_shift is not None and time_shift.active:
        if not spec.time_shiftable:
            shiftable = [name for name, s in SAMPLERS.items() if s.time_shiftable]
            raise ConfigError(f"config.{time_shift.key}.name={time_shift.name!r} shifts rectified-flow time grids; "
                              f"sampler {method!r} has none: use {' or '.join(shiftable)}, or name 'none'")
        if shift_length is None:
            raise ConfigError(f"config.{time_shift.key}: a length-aware shift needs the effective length "
                              f"(shift_length, latent frames)")
    if init_sigma is not None:
        if init is None:
            raise ConfigError("init_sigma is set but init is None; pass the init latents to start from")
        sigma_max = init_sigma
    if init is not None and not spec.starts_from_init:
        raise ConfigError(f"sampler {method!r} always starts from pure noise; use ddim or a σ-space sampler for init")
    default_min, default_max = spec.sigma_range
    options = SampleOptions(steps=steps, sigma_min=default_min if sigma_min is None else sigma_min,
                            sigma_max=spec.start_level(default_max if sigma_max is None else sigma_max, max_sigma),
                            rho=rho, schedule=schedule, eta=eta, s_noise=s_noise, inpaint=inpaint, betas=betas,
                            time_shift=time_shift, shift_length=shift_length)
    start_key, loop_key = jax.random.split(key)
    noise = jax.random.normal(start_key, shape, dtype)
    init = jnp.zeros(shape, dtype) if init is None else jnp.broadcast_to(jnp.asarray(init, dtype), shape)
    return spec.run(denoise, noise, init, loop_key, options)

"""Model parameterisations behind one x0-denoiser interface, and classifier-free guidance.

Samplers never see an objective. A sampler keeps its state in its own interpolant, x = a·x0 + s·ε:
a = 1 for k-diffusion's σ-space (x = x0 + σε), (cos, sin) for the v-DDIM grid, (1 − t, t) for rectified flow.
It asks `denoise(x, a, s)` for the estimate of x0. The adapter rescales x to the model's own interpolant at the same
signal-to-noise ratio (SNR), finds that interpolant's time t, feeds the model `model_time(t)` (the objective's
definition, diffusion/objectives.py, the same function its training uses) and converts the output (ε, v,
rectified-flow velocity or x0) to x0.

For the v-objective with a = 1 this is k-diffusion's VDenoiser: x_model = x/√(1+σ²), t = atan(σ)·2/π.
Interpolants are compared through their SNR. Rescaling by the norms √(a²+s²) therefore stays finite at pure noise
(a = 0, t = 1), which the v-DDIM and rectified-flow grids start from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from musicdiff.errors import ConfigError

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
"""model_fn(x_model [B, ...], t [B]) -> raw model output, in the model's own input scaling and model time."""

Denoiser = Callable[[jax.Array, jax.Array | float, jax.Array | float], jax.Array]
"""denoise(x, alpha, sigma) -> x0 estimate, for a state x = alpha·x0 + sigma·ε (alpha, sigma scalars or [B])."""

PREDICTIONS = ("eps", "v", "velocity", "x0")


@dataclasses.dataclass(frozen=True)
class CosineInterpolant:
    """alpha = cos(πt/2), sigma = sin(πt/2), t ∈ [0, 1]: SAO's v-objective and the cosine ε schedule."""

    variance_preserving = True

    def coefficients(self, t):
        # sin(π(1−t)/2) instead of cos(πt/2) so that alpha is exactly 0 at t = 1 in float32.
        return jnp.sin(0.5 * math.pi * (1.0 - t)), jnp.sin(0.5 * math.pi * t)

    def time(self, alpha, sigma):
        return jnp.clip(jnp.arctan2(sigma, alpha) * (2.0 / math.pi), 0.0, 1.0)

    @property
    def max_sigma(self) -> float:
        return math.inf


@dataclasses.dataclass(frozen=True)
class LinearInterpolant:
    """Rectified flow: x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1]."""

    variance_preserving = False

    def coefficients(self, t):
        return 1.0 - t, t

    def time(self, alpha, sigma):
        # Same SNR: (1 − t)/t = alpha/sigma.
        return sigma / (alpha + sigma)

    @property
    def max_sigma(self) -> float:
        return math.inf


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteVPInterpolant:
    """A discrete DDPM schedule ᾱ_k, k = 0..T−1, used as a function of a fractional index t.

    Between integer indices, log σ (σ² = (1 − ᾱ)/ᾱ) is interpolated linearly, as k-diffusion's DiscreteSchedule does.
    `quantize` rounds t to the nearest index, for models that only saw integer timesteps. Noise levels outside the
    table clamp to its ends (`max_sigma`). Its time is the index itself; the objective maps it to model time.
    """

    alphas_cumprod: np.ndarray
    quantize: bool = False
    variance_preserving = True

    @classmethod
    def from_betas(cls, betas, quantize: bool = False) -> DiscreteVPInterpolant:
        return cls(np.cumprod(1.0 - np.asarray(betas, np.float64)), quantize)

    @property
    def log_sigmas(self) -> np.ndarray:
        alphas_cumprod = np.asarray(self.alphas_cumprod, np.float64)
        return 0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod)

    def coefficients(self, t):
        log_sigmas = jnp.asarray(self.log_sigmas, jnp.float32)
        sigma_ve = jnp.exp(jnp.interp(t, jnp.arange(log_sigmas.shape[0], dtype=jnp.float32), log_sigmas))
        alpha = jax.lax.rsqrt(1.0 + sigma_ve**2)
        return alpha, sigma_ve * alpha

    def time(self, alpha, sigma):
        log_sigmas = jnp.asarray(self.log_sigmas, jnp.float32)
        t = jnp.interp(jnp.log(sigma) - jnp.log(alpha), log_sigmas, jnp.arange(log_sigmas.shape[0], dtype=jnp.float32))
        return jnp.round(t) if self.quantize else t

    @property
    def max_sigma(self) -> float:
        """σ-space noise level of the last table entry: a sampler starting above it starts at this level instead."""
        return float(np.exp(self.log_sigmas[-1]))


@dataclasses.dataclass(frozen=True, eq=False)
class LogSNRInterpolant:
    """A continuous variance-preserving schedule given by its log-SNR λ(t) = log(ᾱ/(1 − ᾱ)) and the inverse t(λ)."""

    log_snr: Callable[[jax.Array], jax.Array]
    log_snr_inverse: Callable[[jax.Array], jax.Array]
    variance_preserving = True

    def coefficients(self, t):
        log_snr = self.log_snr(t)
        return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))

    def time(self, alpha, sigma):
        return self.log_snr_inverse(2.0 * (jnp.log(alpha) - jnp.log(sigma)))

    @property
    def max_sigma(self) -> float:
        return math.inf


Interpolant = CosineInterpolant | LinearInterpolant | DiscreteVPInterpolant | LogSNRInterpolant


@dataclasses.dataclass(frozen=True, eq=False)
class Parameterization:
    """What the model predicts (`prediction`) on which noise path (`interpolant`), and the model's input time at the
    interpolant's time t (`model_time`, identity unless the objective says otherwise)."""

    interpolant: Interpolant
    prediction: str
    model_time: Callable[[jax.Array], jax.Array] = lambda t: jnp.asarray(t, jnp.float32)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction={self.prediction!r}: must be one of {', '.join(PREDICTIONS)}")
        if self.prediction == "v" and not self.interpolant.variance_preserving:
            raise ConfigError("prediction='v' needs a variance-preserving interpolant (alpha² + sigma² = 1)")
        if self.prediction == "velocity" and not isinstance(self.interpolant, LinearInterpolant):
            raise ConfigError("prediction='velocity' (rectified flow) needs the LinearInterpolant")

    def to_x0(self, output: jax.Array, x_model: jax.Array, t: jax.Array) -> jax.Array:
        """The x0 estimate from a raw model output at model input x_model and model time t ([B] or scalar)."""
        alpha, sigma = (_per_sample(c, x_model) for c in self.interpolant.coefficients(t))
        if self.prediction == "eps":
            return (x_model - sigma * output) / alpha
        if self.prediction == "v":  # v = alpha·ε − sigma·x0
            return alpha * x_model - sigma * output
        if self.prediction == "velocity":  # velocity = ε − x0, x_t = x0 + t·velocity
            return x_model - _per_sample(t, x_model) * output
        return output


def make_denoiser(model_fn: ModelFn, parameterization: Parameterization) -> Denoiser:
    """Wraps a raw model as denoise(x, alpha, sigma) -> x0 estimate, for a state x = alpha·x0 + sigma·ε."""
    interpolant = parameterization.interpolant

    def denoise(x, alpha, sigma):
        alpha = jnp.asarray(alpha, jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32)
        t = interpolant.time(alpha, sigma)
        model_alpha, model_sigma = interpolant.coefficients(t)
        # Same SNR on both paths, so the states differ only by the ratio of the norms √(a² + s²).
        scale = jnp.hypot(model_alpha, model_sigma) / jnp.hypot(alpha, sigma)
        x_model = (x * _per_sample(scale, x)).astype(x.dtype)
        t_batch = jnp.broadcast_to(t, (x.shape[0],)).astype(jnp.float32)
        output = model_fn(x_model, parameterization.model_time(t_batch))
        return parameterization.to_x0(output, x_model, t_batch).astype(x.dtype)

    return denoise


def guidance_interval(parameterization: Parameterization, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Model-time bounds (for `cfg_denoiser(interval=...)`) of the noise levels σ/α in [sigma_min, sigma_max].

    σ/α is k-diffusion's σ, the noise level every sampler's state maps to by its SNR (rectified flow: t/(1 − t), so
    t = 0.5 is 1). Model time increases with the noise level for every objective here, so the bounds keep their
    order; sigma_min <= 0 and sigma_max = inf leave that side open."""
    if not 0 <= sigma_min <= sigma_max:
        raise ConfigError(f"cfg interval [{sigma_min}, {sigma_max}]: need 0 <= cfg_sigma_min <= cfg_sigma_max")

    def model_time(level: float) -> float:
        t = parameterization.interpolant.time(jnp.float32(1.0), jnp.float32(level))
        return float(parameterization.model_time(t))

    return (-math.inf if sigma_min <= 0 else model_time(sigma_min),
            math.inf if math.isinf(sigma_max) else model_time(sigma_max))


def doubled_call(denoise_fn: Callable[..., jax.Array], cond: Any, null_cond: Any) -> ModelFn:
    """(x2, t2) -> denoise_fn on a doubled batch: cond for the first half, null_cond (broadcast to cond's shapes) for
    the second."""

    def call(x2, t2):
        null = jax.tree.map(lambda c, n: jnp.broadcast_to(jnp.asarray(n, jnp.asarray(c).dtype), jnp.shape(c)),
                            cond, null_cond)
        return denoise_fn(x2, t2, jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null))

    return call


def projected_guidance(conditional: jax.Array, unconditional: jax.Array, scale: float | jax.Array,
                       parallel: float = 0.0, norm_threshold: float = 0.0) -> jax.Array:
    """Adaptive projected guidance (APG, Sadat et al. 2024) on x0 estimates [B, ...], per sample over the other axes:
    the guidance Δ = cond − uncond, clipped to norm `norm_threshold` (0: no clip), split into its part parallel to
    cond and the rest; out = cond + (scale − 1)·(Δ⊥ + parallel·Δ∥). parallel = 1 without a clip is plain CFG; the
    parallel part is what oversaturates at high scales (Stable Audio 3 drops it: parallel 0)."""
    axes = tuple(range(1, conditional.ndim))
    delta = conditional - unconditional
    if norm_threshold > 0:
        norm = jnp.sqrt(jnp.sum(delta**2, axis=axes, keepdims=True))
        delta = delta * jnp.minimum(1.0, norm_threshold / jnp.maximum(norm, 1e-12))
    energy = jnp.sum(conditional**2, axis=axes, keepdims=True)
    along = jnp.sum(delta * conditional, axis=axes, keepdims=True) / jnp.maximum(energy, 1e-12) * conditional
    return conditional + (scale - 1.0) * (delta - along + parallel * along)


def projected_guidance_denoiser(doubled: Denoiser, scale: float, parallel: float = 0.0, norm_threshold: float = 0.0,
                                sigma_interval: tuple[float, float] = (0.0, math.inf)) -> Denoiser:
    """A Denoiser under APG. `doubled(x2, alpha2, sigma2)` is the x0-denoiser (`make_denoiser`) of a model run on
    a doubled batch (`doubled_call`): conditional rows first. Guidance applies at noise levels σ/α inside
    `sigma_interval`; elsewhere the conditional estimate alone."""

    def denoise(x, alpha, sigma):
        alpha = jnp.asarray(alpha, jnp.float32)
        sigma = jnp.asarray(sigma, jnp.float32)
        twice = lambda v: v if v.ndim == 0 else jnp.concatenate([v, v], axis=0)  # noqa: E731
        both = doubled(jnp.concatenate([x, x], axis=0), twice(alpha), twice(sigma))
        conditional, unconditional = jnp.split(both, 2, axis=0)
        guided = projected_guidance(conditional, unconditional, scale, parallel, norm_threshold)
        level = sigma / jnp.maximum(alpha, 1e-30)
        inside = (level >= sigma_interval[0]) & (level <= sigma_interval[1])
        return jnp.where(_per_sample(inside, x), guided, conditional).astype(x.dtype)

    return denoise


def cfg_denoiser(denoise_fn: Callable[..., jax.Array], cond: Any, null_cond: Any, scale: float | jax.Array,
                 rescale: float = 0.0, rescale_axis: int = 1, doubled_fn: ModelFn | None = None,
                 interval: tuple[float, float] | None = None) -> ModelFn:
    """Classifier-free guidance on the raw model output, as the reference does inside the DiT forward.

    denoise_fn(x, t, cond) -> output. Conditional and unconditional passes run as ONE call on a doubled batch
    (x, t and every cond leaf concatenated with its null counterpart; null leaves broadcast to the cond shapes).
    out = uncond + scale·(cond − uncond). rescale = φ > 0 applies the std rescale of Lin et al. (2023), the
    reference's `scale_phi`: out ← φ·out·std(cond)/std(out) + (1 − φ)·out, with std over `rescale_axis`. The
    default 1 is the channel axis of the [B, C, L] latents that the reference and our DiT use.
    A Python `scale == 1` calls the conditional model alone. A traced scale equal to 1 selects the conditional half
    of the doubled batch, so the result is exact either way.
    `null_cond` is the unconditional input, or a negative prompt's condition (guidance then pushes away from it).
    `interval` = (lo, hi) in model time (`guidance_interval`): rows whose time lies outside get the conditional
    output alone (Kynkäänniemi et al. 2024: guidance in the middle noise levels only).
    `doubled_fn(x2, t2)`, if given, replaces the doubled call: the model on [x; x] with cond for the first half and
    null_cond for the second, in whatever cheaper form the caller has (the DiT's implicit null context).
    """
    if not isinstance(scale, jax.Array) and float(scale) == 1.0:
        return lambda x, t: denoise_fn(x, t, cond)

    run_doubled = doubled_fn or doubled_call(denoise_fn, cond, null_cond)

    def guided(x, t):
        both = run_doubled(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0))
        conditional, unconditional = jnp.split(both, 2, axis=0)
        guided_out = unconditional + scale * (conditional - unconditional)
        if rescale:
            std_cond = jnp.std(conditional, axis=rescale_axis, keepdims=True)
            std_guided = jnp.std(guided_out, axis=rescale_axis, keepdims=True)
            ratio = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1.0), 1.0)
            guided_out = rescale * guided_out * ratio + (1.0 - rescale) * guided_out
        use = jnp.asarray(scale) != 1.0
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])
            use = use & inside.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(use, guided_out, conditional)

    return guided


def _per_sample(value, x: jax.Array) -> jax.Array:
    """A scalar stays a scalar; a [B] vector is shaped [B, 1, ...] to broadcast against x."""
    value = jnp.asarray(value)
    return value if value.ndim == 0 else value.reshape((-1,) + (1,) * (x.ndim - 1))

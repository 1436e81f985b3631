"""Length-aware time shifts (spec §3.6) against their closed forms and the spec's printed 8-step schedules, and the
rectified-flow samplers running on the shifted grid."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicdiff.diffusion.samplers import rf_logsnr_times, sample
from musicdiff.diffusion.time_shift import TimeShift, shifted_times
from musicdiff.errors import ConfigError

# Spec §3.6, "8-step schedules (computed)", printed to 4 decimals.
SPEC_LOGSNR_RATE0 = [1, .9944, .9845, .9579, .8909, .7455, .5125, .2739, 0]
SPEC_FULL_AT_1292 = [1, .9322, .8550, .7661, .6627, .5410, .3957, .2192, 0]


def test_spec_eight_step_schedules():
    logsnr = shifted_times(TimeShift("logsnr"), 8, 1.0, 1292)
    np.testing.assert_allclose(logsnr, SPEC_LOGSNR_RATE0, atol=5e-5, rtol=0)
    full = shifted_times(TimeShift("full"), 8, 1.0, 1292)
    np.testing.assert_allclose(full, SPEC_FULL_AT_1292, atol=5e-5, rtol=0)


def test_full_shift_factor_at_the_spec_lengths():
    alpha = TimeShift("full").alpha(jnp.asarray([100.0, 256.0, 1292.0, 4096.0, 9000.0]))
    expected = [math.exp(0.5), math.exp(0.5), math.exp(0.5 + 0.65 * 1036 / 3840), math.exp(1.15), math.exp(1.15)]
    np.testing.assert_allclose(alpha, expected, rtol=1e-6)  # 1.65, 1.65, 1.97, 3.16, 3.16 (spec)


def test_full_shift_is_the_reference_formula():
    t = np.linspace(0.01, 0.99, 7)
    length = 700.0
    mu = -(0.5 + 0.65 * (length - 256) / 3840)
    reference = 1 - math.exp(mu) / (math.exp(mu) + t / (1 - t))
    np.testing.assert_allclose(TimeShift("full")(t, length), reference, atol=1e-6)


def test_flux_interpolates_log_alpha_in_log_length():
    shift = TimeShift("flux", alpha_min=2.0, alpha_max=8.0, min_length=100.0, max_length=10000.0)
    # log 1000 is halfway between log 100 and log 10000: α = sqrt(2·8) = 4.
    np.testing.assert_allclose(shift.alpha(1000.0), 4.0, rtol=1e-6)
    np.testing.assert_allclose(shift(0.5, 1000.0), 4 * 0.5 / (1 + 3 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(shift.alpha(jnp.asarray([10.0, 1e6])), [2.0, 8.0], rtol=1e-6)
    default = TimeShift("flux")  # the Gradio default: 6.93 at every length
    np.testing.assert_allclose(default(0.25, 3000.0), 6.93 * 0.25 / (1 + 5.93 * 0.25), rtol=1e-6)


def test_logsnr_rate_moves_the_start_per_doubling():
    shift = TimeShift("logsnr", rate=1.0)
    t = jnp.asarray([0.0, 0.3, 0.7, 1.0])
    lam_start = -6.2 - 1.0 * math.log2(4000 / 2000)  # one doubling past the anchor: -7.2
    lam = 2.0 - np.asarray([0.3, 0.7]) * (2.0 - lam_start)
    np.testing.assert_allclose(shift(t, 4000.0), [0.0, *(1 / (1 + np.exp(lam))), 1.0], atol=1e-6)


@pytest.mark.parametrize("name", ["full", "flux", "logsnr"])
def test_shifts_are_monotone_with_exact_ends_and_invert(name):
    shift = TimeShift(name, rate=0.5)
    t = jnp.linspace(0.0, 1.0, 101)
    for length in (64.0, 1292.0, 8000.0):
        shifted = np.asarray(shift(t, length))
        assert shifted[0] == 0.0 and shifted[-1] == 1.0
        assert np.all(np.diff(shifted) > 0)
        np.testing.assert_allclose(shift.inverse(shifted[1:-1], length), t[1:-1], atol=2e-5)


def test_audio_to_audio_grid_starts_at_t_max_and_stays_monotone():
    times = np.asarray(shifted_times(TimeShift("logsnr"), 8, 0.5, 1292))
    assert times[0] == np.float32(0.5) and times[-1] == 0.0
    assert np.all(np.diff(times) < 0)  # the reference's reset first entry would give 0.5, 0.830, ... (spec §7)


def test_none_leaves_the_samplers_grid_alone():
    identity = TimeShift()
    np.testing.assert_array_equal(identity(jnp.asarray([0.2, 0.9]), 500.0), [np.float32(0.2), np.float32(0.9)])
    key, shape = jax.random.key(0), (1, 2, 3)
    denoise = lambda x, a, s: 0.5 * x  # noqa: E731
    plain = sample("rf-euler", denoise, key, shape, steps=4)
    with_none = sample("rf-euler", denoise, key, shape, steps=4, time_shift=identity, shift_length=10.0)
    np.testing.assert_array_equal(plain, with_none)


def test_rf_euler_runs_on_the_shifted_grid():
    """x0 estimate = σ (the current time t) makes Euler's result depend on every grid point; the golden value is
    Euler by hand on the closed-form grid sigmoid(8.2·t − 2)."""
    steps, shape, key = 8, (1, 1, 4), jax.random.key(3)
    out = sample("rf-euler", lambda x, a, s: jnp.broadcast_to(s, x.shape), key, shape, steps=steps,
                 time_shift=TimeShift("logsnr"), shift_length=1292.0)
    grid = 1 / (1 + np.exp(-(8.2 * np.linspace(1, 0, steps + 1) - 2)))
    grid[0], grid[-1] = 1.0, 0.0
    x = np.asarray(jax.random.normal(jax.random.split(key)[0], shape, jnp.float32), np.float64)
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * (x - t) / t
    np.testing.assert_allclose(out, x, atol=1e-5)
    assert not np.allclose(out, sample("rf-euler", lambda x, a, s: jnp.broadcast_to(s, x.shape), key, shape,
                                       steps=steps), atol=1e-3)  # the default log-SNR grid differs


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="config.time_shift.name"):
        TimeShift.from_config({"name": "linear"})
    with pytest.raises(ConfigError, match="config.time_shift.bogus"):
        TimeShift.from_config({"name": "full", "bogus": 1})
    with pytest.raises(ConfigError, match="rf-euler or pingpong"):
        sample("dpmpp-2m", lambda x, a, s: x, jax.random.key(0), (1, 1, 2), steps=2,
               time_shift=TimeShift("full"), shift_length=10.0)
    assert TimeShift.from_config(None) == TimeShift() and not TimeShift.from_config({}).active
    assert rf_logsnr_times(2).shape == (3,)

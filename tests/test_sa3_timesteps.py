"""Stable Audio 3's training timestep samplers (musicdiff/diffusion/timesteps.py) against the reference's own maps
(tests/reference/sa3: inference/sampling.py), fed the same normal or uniform draws."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from musicdiff.diffusion.timesteps import (log_snr_timesteps_from_log_snr, sa3_truncated_logit_normal_from_normal,
                                           sample_timesteps)
from sa3_reference import import_reference

DRAWS = 4096


@pytest.fixture(scope="module")
def sampling():
    return import_reference().inference.sampling


def _fixed(monkeypatch, name, values):
    monkeypatch.setattr(torch, name, lambda *shape, **kw: torch.as_tensor(values))


def test_the_maps_match_the_reference_on_the_same_draws(sampling, monkeypatch):
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(DRAWS).astype(np.float32)
    uniform = rng.random(DRAWS).astype(np.float32)
    _fixed(monkeypatch, "randn", normal)
    expected = 1 - sampling.truncated_logistic_normal_rescaled(DRAWS).numpy()  # the wrapper flips it
    np.testing.assert_allclose(sa3_truncated_logit_normal_from_normal(jnp.asarray(normal)), expected, atol=2e-6)
    expected = sampling.sample_timesteps_logsnr(DRAWS, mean_logsnr=-1.2, std_logsnr=2.0).numpy()
    np.testing.assert_allclose(log_snr_timesteps_from_log_snr(jnp.asarray(-1.2 + 2.0 * normal)), expected, atol=1e-6)
    _fixed(monkeypatch, "rand", uniform)
    expected = sampling.sample_timesteps_logsnr_uniform(DRAWS, min_logsnr=-6.0, max_logsnr=5.0).numpy()
    np.testing.assert_allclose(log_snr_timesteps_from_log_snr(jnp.asarray(-6.0 + 11.0 * uniform)), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["sa3_truncated_logit_normal", "log_snr", "log_snr_uniform"])
def test_samplers_stay_in_their_range_and_one_shot_sets_t_to_one(name):
    config = ml_collections.ConfigDict(dict(timestep_sampler=name))
    t = np.asarray(sample_timesteps(jax.random.key(0), DRAWS, config))
    if name == "sa3_truncated_logit_normal":
        # s >= 0.075 after the cut, so t = 1 - (s - 0.075) / 0.925 lies in [0, 1]. Its median is s at the median of
        # the cut normal: z = Φ⁻¹((Φ(logit 0.075) + 1) / 2) = Φ⁻¹(0.50300) = 0.00752, s = sigmoid(z) = 0.50188,
        # t = 1 - (0.50188 - 0.075) / 0.925 = 0.5385.
        assert t.min() >= 0.0 and t.max() <= 1.0
        assert np.median(t) == pytest.approx(0.5385, abs=0.02)
    else:
        assert t.min() >= 1e-4 and t.max() <= 1 - 1e-4 + 1e-7  # the clip, up to float32 rounding of 1 - 1e-4
    config.p_one_shot = 0.25
    shot = np.asarray(sample_timesteps(jax.random.key(0), DRAWS, config))
    changed = shot != t
    assert np.all(shot[changed] == 1.0) and abs(changed.mean() - 0.25) < 0.03


def test_the_sa3_generate_preset_samples_as_the_reference_does_by_default():
    """configs/generate.py:sa3 is the reference's default for post-trained checkpoints: 8 ping-pong steps, no CFG,
    the LogSNR schedule at rate 0, whose 8-step grid stable_audio_3.md §3.6 lists."""
    from musicdiff.config import load_config
    from musicdiff.diffusion.time_shift import shifted_times
    from musicdiff.inference.generate import SamplerSettings

    settings = SamplerSettings.from_config(load_config("configs/generate.py:sa3"))
    assert (settings.sampler, settings.steps, settings.cfg_scale) == ("pingpong", 8, 1.0)
    grid = np.asarray(shifted_times(settings.time_shift, settings.steps, settings.sigma_max, 387))
    np.testing.assert_allclose(grid, [1, .9944, .9845, .9579, .8909, .7455, .5125, .2739, 0], atol=5e-5)

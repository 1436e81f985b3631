"""Bootstrap intervals against closed forms, the verdicts drawn from them, the FD of weighted resamples, cropping
of clips, generation indexes of existing audio, and the series plot with reference rows."""

import math

import numpy as np
import pytest

from musicdiff.audio.io import write_audio
from musicdiff.eval import generation_sets
from musicdiff.eval.frechet import EmbeddingStats, FrechetToReference, frechet_distance, gaussian_fit
from musicdiff.eval.intervals import (IMPROVED, NO_CHANGE, WORSE, bootstrap_interval, compare, grouped_mean,
                                      intervals_separate)


def test_bernoulli_interval_matches_the_normal_approximation():
    n, p = 400, 0.5
    sample = np.array([1.0] * 200 + [0.0] * 200)
    half_width = 1.96 * math.sqrt(p * (1 - p) / n)
    lo, hi = bootstrap_interval(sample, n_resamples=1000, seed=0, level=0.95)
    assert lo == pytest.approx(p - half_width, abs=0.01)
    assert hi == pytest.approx(p + half_width, abs=0.01)


def test_constant_sample_has_a_zero_width_interval():
    lo, hi = bootstrap_interval([0.3] * 50)
    assert lo == hi == pytest.approx(0.3)


def test_interval_is_deterministic_in_the_seed_and_the_function_form_agrees():
    values = np.random.default_rng(1).standard_normal(30)
    first = bootstrap_interval(values, n_resamples=200, seed=5)
    assert bootstrap_interval(values, n_resamples=200, seed=5) == first
    assert bootstrap_interval(values, n_resamples=200, seed=6) != first
    as_function = bootstrap_interval(lambda idx: float(values[idx].mean()), n_resamples=200, seed=5, size=30)
    assert as_function == pytest.approx(first)
    with pytest.raises(ValueError, match="size="):
        bootstrap_interval(lambda idx: 0.0)


def test_grouped_mean_averages_per_group_first():
    statistic = grouped_mean([1.0, 3.0, 10.0], ["a", "a", "b"])
    assert statistic(np.arange(3)) == pytest.approx((2.0 + 10.0) / 2)
    assert statistic(np.array([0, 0, 2])) == pytest.approx((1.0 + 10.0) / 2)  # a resample without clip 1
    assert statistic(np.array([2, 2, 2])) == pytest.approx(10.0)  # group "a" absent from the resample


def test_intervals_separate_on_hand_made_intervals():
    assert intervals_separate((0.0, 1.0), (1.5, 2.0)) and intervals_separate((1.5, 2.0), (0.0, 1.0))
    assert not intervals_separate((0.0, 1.0), (0.9, 2.0))
    assert not intervals_separate((0.0, 1.0), (1.0, 2.0))  # touching intervals do not separate
    assert not intervals_separate((0.0, 3.0), (1.0, 2.0))


def test_compare_follows_the_metric_direction():
    assert compare("fd_openl3", (10.0, 12.0), (5.0, 6.0)) == IMPROVED  # lower is better
    assert compare("kl_passt", (1.0, 2.0), (3.0, 4.0)) == WORSE
    assert compare("key_acc", (0.1, 0.2), (0.5, 0.6)) == IMPROVED  # higher is better
    assert compare("clap_score", (0.1, 0.2), (0.0, 0.05)) == WORSE
    assert compare("key_acc", (0.1, 0.3), (0.2, 0.6)) == NO_CHANGE
    assert compare("custom", (0.1, 0.2), (0.5, 0.6), higher_is_better=False) == WORSE


def test_fd_of_weighted_frames_matches_the_1d_closed_form():
    reference = EmbeddingStats(np.array([3.0]), np.array([[8.0]]), 10, "toy")
    frames = np.array([[-1.0], [1.0]])
    # 1-d FD = (mu1 - mu2)^2 + (s1 - s2)^2; frames -1, 1: mean 0, variance 2 (N - 1)
    expected = 9.0 + (math.sqrt(2) - math.sqrt(8)) ** 2
    assert FrechetToReference(frames, reference).distance([1, 1]) == pytest.approx(expected)
    # weights (2, 1) pool -1, -1, 1: mean -1/3, variance (4/9 + 4/9 + 16/9) / 2 = 4/3
    expected = (-1 / 3 - 3.0) ** 2 + (math.sqrt(4 / 3) - math.sqrt(8)) ** 2
    assert FrechetToReference(frames, reference).distance([2, 1]) == pytest.approx(expected)


@pytest.mark.parametrize("frames", [5, 40])  # fewer frames than dimensions (the SVD of frames) and more
def test_fd_of_weighted_frames_equals_fd_of_the_repeated_frames(frames):
    rng = np.random.default_rng(0)
    dim = 8
    reference = EmbeddingStats.from_frames(rng.standard_normal((60, dim)) + 0.5, "toy")
    x = rng.standard_normal((frames, dim))
    weights = rng.integers(0, 3, frames)
    weights[:2] = 1
    repeated = np.repeat(x, weights, axis=0)
    mu, sigma = gaussian_fit(repeated)
    # rel 1e-7: with N < D, frechet_distance's eigh square root turns the zero eigenvalues' rounding (1e-16) into
    # 1e-8 terms; the weighted form takes the SVD of the projected frames and has none
    assert FrechetToReference(x, reference).distance(weights) == pytest.approx(
        frechet_distance(mu, sigma, reference.mu, reference.sigma), rel=1e-7)


def test_crop_keeps_the_first_seconds(tmp_path):
    audio = np.linspace(-0.5, 0.5, 8000, dtype=np.float32)[None]
    write_audio(tmp_path / "a.wav", audio, 8000)
    clip = generation_sets.AudioClip(tmp_path / "a.wav", "p", "p")
    assert clip.seconds() == pytest.approx(1.0)
    assert clip.load()[0].shape == (1, 8000)
    cropped, rate = generation_sets.crop_clips([clip], 0.5)[0].load()
    assert rate == 8000 and cropped.shape == (1, 4000)
    np.testing.assert_allclose(cropped, clip.load()[0][:, :4000])


def test_write_index_lists_existing_audio_as_a_generation_set(tmp_path):
    for name in ("x.wav", "y.wav"):
        write_audio(tmp_path / "audio" / name, np.zeros((1, 800), np.float32), 8000)
    clips = [generation_sets.AudioClip(tmp_path / "audio" / "x.wav", "a song", "a song", dict(bpm=120)),
             generation_sets.AudioClip(tmp_path / "audio" / "y.wav", "another", "another")]
    generation_sets.write_index(tmp_path / "set", clips)
    read = generation_sets.read_generations(tmp_path / "set")
    assert [c.path for c in read] == [c.path.resolve() for c in clips]
    assert [c.prompt for c in read] == ["a song", "another"] and read[0].attributes == {"bpm": 120}


def test_metric_point_and_plot_with_reference_rows(tmp_path):
    assert generation_sets.metric_point(2.0) == (2.0, 2.0, 2.0)
    assert generation_sets.metric_point(dict(value=1.0, lo=0.5, hi=2.0)) == (1.0, 0.5, 2.0)
    assert generation_sets.metric_point(float("nan")) is None and generation_sets.metric_point("x") is None
    series = {0: {"fd_x": dict(value=10.0, lo=9.0, hi=12.0), "acc": 0.2},
              100: {"fd_x": dict(value=4.0, lo=4.5, hi=6.0), "acc": dict(value=0.6, lo=0.5, hi=0.7)}}
    rows = {"real": {"fd_x": dict(value=0.0, lo=0.5, hi=1.5), "acc": dict(value=0.9, lo=0.8, hi=1.0)}}
    path = generation_sets.plot_series(series, tmp_path / "series.png", title="t", reference_rows=rows)
    assert path.stat().st_size > 1000
    only_rows = generation_sets.plot_series({}, tmp_path / "rows.png", reference_rows=rows)
    assert only_rows.stat().st_size > 1000

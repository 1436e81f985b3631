"""Fréchet distance, statistics files, KL and CLAP score against closed forms and reference implementations."""

import math

import numpy as np
import pytest
import scipy.linalg

from musicdiff.errors import DataError
from musicdiff.eval import scores
from musicdiff.eval.frechet import (EmbeddingStats, cached_stats, frechet_distance, gaussian_fit, pooled_stats,
                                    source_hash, trace_sqrt_product)


def random_spd(rng, dim, scale=1.0):
    a = rng.standard_normal((dim, dim))
    return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


# ---- Fréchet distance ------------------------------------------------------------------------------------------

def test_fd_of_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 64), rng.uniform(0.1, 3.0, 64)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert abs(got - expected) / expected <= 1e-6


def test_fd_of_non_commuting_2x2_gaussians_matches_the_closed_form():
    # For 2x2 M with real eigenvalues >= 0: Tr(M^½) = sqrt(Tr M + 2 sqrt(det M)); M = S1 S2 does not commute here.
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    trace_root = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    got = frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - expected) / expected <= 1e-6


def test_fd_of_scaled_covariance_matches_the_closed_form():
    # S2 = c² S1: Tr((S1 S2)^½) = c Tr(S1), so FD = |dmu|² + (1 - c)² Tr(S1), for any SPD S1.
    rng = np.random.default_rng(1)
    s1 = random_spd(rng, 128)
    c = 1.7
    mu1, mu2 = rng.standard_normal(128), rng.standard_normal(128)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s1)
    assert abs(frechet_distance(mu1, s1, mu2, c**2 * s1) - expected) / expected <= 1e-6


def test_trace_term_matches_scipy_sqrtm_on_random_spd():
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(rng, 96), random_spd(rng, 96, 2.0)
    reference = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert abs(trace_sqrt_product(s1, s2) - reference) / reference <= 1e-6


@pytest.mark.parametrize("frames, dim", [(2000, 64), (40, 64)])  # full rank, and singular (N < D)
def test_fd_of_identical_sets_is_zero(frames, dim):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((frames, dim)) @ rng.standard_normal((dim, dim))
    mu, sigma = gaussian_fit(x)
    assert frechet_distance(mu, sigma, mu, sigma) <= 1e-8


def test_fd_grows_with_a_shift_and_is_symmetric():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 16))
    a = pooled_stats([x], "bb")
    b = pooled_stats([x + 0.5], "bb")
    c = pooled_stats([x * 2.0 + 0.5], "bb")
    assert a.distance_to(b) == pytest.approx(16 * 0.25, rel=1e-9)  # same covariance: only |dmu|² remains
    assert a.distance_to(c) > a.distance_to(b)
    assert a.distance_to(c) == pytest.approx(c.distance_to(a), rel=1e-10)


def test_gaussian_fit_uses_n_minus_one():
    x = np.array([[0.0], [2.0]])
    mu, sigma = gaussian_fit(x)
    assert mu[0] == 1.0 and sigma[0, 0] == 2.0


# ---- statistics files -------------------------------------------------------------------------------------------

def test_stats_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(5)
    probs = {"audioset": {"a piano piece": np.array([0.2, 0.8]), "drums": np.array([0.5, 0.5])},
             "mode": {"a piano piece": np.array([1.0, 0.0])}}
    stats = EmbeddingStats.from_frames(rng.standard_normal((50, 8)), "openl3-x", "abc123", probs)
    path = stats.save(tmp_path / "ref.npz")
    with np.load(path, allow_pickle=False) as raw:  # plain arrays only
        assert str(raw["backbone_id"]) == "openl3-x"
    loaded = EmbeddingStats.load(path, expect_backbone="openl3-x")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.count, loaded.source_hash) == (50, "abc123")
    np.testing.assert_array_equal(loaded.label_probs["audioset"]["drums"], [0.5, 0.5])
    assert set(loaded.label_probs["mode"]) == {"a piano piece"}  # prompts a group lacks are not invented


def test_stats_of_another_backbone_are_refused(tmp_path):
    rng = np.random.default_rng(6)
    a = EmbeddingStats.from_frames(rng.standard_normal((20, 4)), "openl3-mel256")
    b = EmbeddingStats.from_frames(rng.standard_normal((20, 4)), "embedded-evaluator-1234")
    path = a.save(tmp_path / "a.npz")
    with pytest.raises(DataError, match="computed with backbone 'openl3-mel256'.*uses 'embedded-evaluator-1234'"):
        EmbeddingStats.load(path, expect_backbone="embedded-evaluator-1234")
    with pytest.raises(DataError, match="not comparable"):
        a.distance_to(b)


def test_foreign_npz_without_backbone_id_is_refused(tmp_path):
    path = tmp_path / "sa.npz"
    np.savez(path, mu_ref=np.zeros(3), sigma_ref=np.eye(3))  # stable-audio-metrics' own layout
    with pytest.raises(DataError, match="missing mu, sigma, backbone_id"):
        EmbeddingStats.load(path)


def test_reference_stats_are_cached_by_backbone_and_file_list(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.wav")
        files[-1].write_bytes(b"x" * (i + 1))
    calls = []

    def compute():
        calls.append(1)
        return EmbeddingStats.from_frames(np.random.default_rng(len(calls)).standard_normal((10, 3)), "bb")

    key = source_hash(files, {"rate": 16000})
    first, cached1 = cached_stats(tmp_path / "cache", "bb", key, compute)
    second, cached2 = cached_stats(tmp_path / "cache", "bb", key, compute)
    assert (cached1, cached2, len(calls)) == (False, True, 1)
    np.testing.assert_array_equal(first.mu, second.mu)
    files[0].write_bytes(b"changed!")  # another file content -> another key -> recomputed
    assert source_hash(files, {"rate": 16000}) != key
    assert source_hash(files, {"rate": 44100}) != source_hash(files, {"rate": 16000})


# ---- KL ----------------------------------------------------------------------------------------------------------

def test_kl_on_known_distributions():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / (0.9 + 1e-6)) + 0.5 * math.log(0.5 / (0.1 + 1e-6))
    assert scores.kl_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    # 0 log 0 = 0 on the target side; the 1e-6 keeps log q finite where q = 0.
    assert scores.kl_divergence(np.array([1.0, 0.0]), np.array([0.25, 0.75])) == pytest.approx(
        math.log(1.0 / (0.25 + 1e-6)), rel=1e-12)
    assert scores.kl_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(
        0.5 * math.log(0.5 / (1.0 + 1e-6)) + 0.5 * math.log(0.5 / 1e-6), rel=1e-12)


def test_kl_direction_is_generated_against_reference_as_stable_audio_metrics():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    gen = {f"id{i}": scores.window_logits_to_probs(rng.standard_normal((3, 10)) * 2) for i in range(4)}
    ref = {f"id{i}": scores.window_logits_to_probs(rng.standard_normal((2, 10)) * 2) for i in range(5)}
    # stable-audio-metrics: F.kl_div((ref + 1e-6).log(), gen, reduction="sum"), averaged over shared ids.
    expected = np.mean([float(torch.nn.functional.kl_div(torch.tensor(ref[k] + 1e-6).log(), torch.tensor(gen[k]),
                                                         reduction="sum")) for k in gen])
    result = scores.paired_kl(gen, ref)
    assert result["pairs"] == 4
    assert result["kl"] == pytest.approx(expected, rel=1e-9)
    assert result["kl_ref_gen"] != pytest.approx(result["kl"], rel=1e-3)  # the other direction differs


def test_window_logits_are_averaged_before_the_softmax():
    logits = np.array([[10.0, 0.0], [0.0, 0.0]])
    mean_then_softmax = np.exp(5.0) / (np.exp(5.0) + 1.0)
    assert scores.window_logits_to_probs(logits)[0] == pytest.approx(mean_then_softmax, rel=1e-12)


def test_grouped_kl_sums_groups():
    gen = {"key": {"p": np.array([0.7, 0.3])}, "mode": {"p": np.array([0.5, 0.5])}}
    ref = {"key": {"p": np.array([0.6, 0.4])}, "mode": {"p": np.array([0.2, 0.8])}}
    result = scores.grouped_paired_kl(gen, ref)
    expected = scores.kl_divergence(gen["key"]["p"], ref["key"]["p"]) + scores.kl_divergence(
        gen["mode"]["p"], ref["mode"]["p"])
    assert result["kl"] == pytest.approx(expected, rel=1e-12)


def test_paired_kl_without_shared_ids_is_an_error():
    with pytest.raises(ValueError, match="no prompt id"):
        scores.paired_kl({"a": np.array([1.0])}, {"b": np.array([1.0])})


# ---- CLAP score --------------------------------------------------------------------------------------------------

def test_clap_score_on_constructed_vectors():
    audio = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, -3.0]])
    text = np.array([[5.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    cos = scores.cosine_similarity(audio, text)
    np.testing.assert_allclose(cos, [1.0, 0.0, 1 / math.sqrt(2), -1.0], rtol=1e-12, atol=1e-15)
    assert scores.clap_score(audio, text)["clap_score"] == pytest.approx((1 + 1 / math.sqrt(2) - 1) / 4, rel=1e-12)
    # Two generations of prompt "a" average first, so each prompt counts once: ((1 + 0) / 2 + 1/√2 + -1) / 3.
    by_prompt = scores.clap_score(audio, text, ["a", "a", "b", "c"])
    assert by_prompt["count"] == 3
    assert by_prompt["clap_score"] == pytest.approx((0.5 + 1 / math.sqrt(2) - 1) / 3, rel=1e-12)


def test_cosine_of_a_zero_vector_is_zero_not_nan():
    assert scores.cosine_similarity(np.zeros(4), np.ones(4))[0] == 0.0

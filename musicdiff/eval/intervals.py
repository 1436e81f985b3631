"""Bootstrap confidence intervals over clips, and the verdicts drawn from them.

A metric averaged over N clips is an estimate from a sample; with the demo's 16 clips, subsets move FD by ±2, so a
single number cannot say whether one checkpoint beats another. Every reported metric therefore carries a
percentile-bootstrap interval: resample the clips with replacement `n_resamples` times, recompute the metric on
each resample, and take the (1 - level) / 2 and (1 + level) / 2 quantiles (Efron's percentile method). The resample
indices come from `np.random.default_rng(seed)`, so an interval is a deterministic function of (data, seed).

Two rows differ only when their intervals do not overlap (`intervals_separate`): a conservative test (two 95 %
intervals that just touch correspond to p well below 0.05), chosen so "improved" is never claimed on noise.
FD's bootstrap is biased upwards (a resample repeats clips, so it is less diverse than the set) and its interval
may not contain the point estimate; the bias is alike for sets of equal size, so rows remain comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import numpy as np

IMPROVED, WORSE, NO_CHANGE = "improved", "worse", "no separable change"
# Metrics where a smaller number is better; every other reported metric (accuracies, CLAP score) is higher-better.
LOWER_IS_BETTER_PREFIXES = ("fd_", "kl_", "inference_time")

Statistic = Callable[[np.ndarray], float]  # resample indices [size] -> the metric on that resample


def resample_indices(size: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, size] indices drawn with replacement from range(size)."""
    if size < 1:
        raise ValueError("bootstrap: no values to resample")
    if n_resamples < 1:
        raise ValueError(f"bootstrap: n_resamples={n_resamples}; need at least 1")
    return np.random.default_rng(seed).integers(0, size, size=(n_resamples, size))


def bootstrap_interval(values_or_fn: Union[Sequence[float], np.ndarray, Statistic], n_resamples: int = 1000,
                       seed: int = 0, level: float = 0.95, *, size: int | None = None) -> tuple[float, float]:
    """The percentile-bootstrap `level` interval (lo, hi).

    `values_or_fn`: per-clip values (the statistic is their mean), or a function of resample indices returning the
    statistic of that resample; a function needs `size`, the number of clips it indexes."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level={level}; need 0 < level < 1")
    if callable(values_or_fn):
        if size is None:
            raise ValueError("bootstrap: a statistic function needs size= (the number of clips it resamples)")
        indices = resample_indices(size, n_resamples, seed)
        statistics = np.array([values_or_fn(row) for row in indices], np.float64)
    else:
        values = np.asarray(values_or_fn, np.float64).reshape(-1)
        indices = resample_indices(values.size, n_resamples, seed)
        statistics = values[indices].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(statistics, [tail, 1.0 - tail])
    return float(lo), float(hi)


def grouped_mean(values: Sequence[float], groups: Sequence[str]) -> Statistic:
    """The statistic "mean per group, then mean over the groups present" (KL and CLAP score average per prompt
    first, so every prompt counts once however many clips it has)."""
    values = np.asarray(values, np.float64)
    _, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    width = int(codes.max()) + 1 if codes.size else 0

    def statistic(indices: np.ndarray) -> float:
        sums = np.bincount(codes[indices], values[indices], minlength=width)
        counts = np.bincount(codes[indices], minlength=width)
        present = counts > 0
        return float(np.mean(sums[present] / counts[present]))

    return statistic


def intervals_separate(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the closed intervals a = (lo, hi) and b do not overlap."""
    return a[1] < b[0] or b[1] < a[0]


def is_higher_better(metric: str) -> bool:
    return not metric.startswith(LOWER_IS_BETTER_PREFIXES)


def compare(metric: str, a: tuple[float, float], b: tuple[float, float],
            higher_is_better: bool | None = None) -> str:
    """The verdict on going from interval `a` (the baseline) to interval `b`: IMPROVED or WORSE only when the
    intervals separate, in the metric's direction (from its name unless `higher_is_better` is given)."""
    if not intervals_separate(a, b):
        return NO_CHANGE
    better_up = is_higher_better(metric) if higher_is_better is None else higher_is_better
    went_up = b[0] > a[1]
    return IMPROVED if went_up == better_up else WORSE

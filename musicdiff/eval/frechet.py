"""Fréchet distance between Gaussian fits of embedding sets, and the statistics files that carry those fits.

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))      (eval_and_control.md §A.3)

Numerics: everything in float64 on the host. The trace term uses the symmetric form
Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A)), A = S1^(1/2) S2 S1^(1/2) (symmetric PSD). S1^(1/2) and S2^(1/2) come
from `eigh` (rounding negatives clipped to 0); sqrt(lambda_i(A)) are then taken as the singular values of
B = S1^(1/2) S2^(1/2), since B B^T = A. That is the same number without forming A: squaring first would turn
rounding-level eigenvalues (1e-16) into 1e-8 terms, so FD of identical singular (N < D) sets would read ~1e-3
instead of ~1e-10. No complex sqrtm, no retry-with-eps.

Statistics follow stable-audio-metrics: every frame of every file pooled (not per-file means), the covariance with
N - 1 normalisation (`np.cov(rowvar=False)`). With fewer frames than dimensions the covariance is singular and FD is
only good for regression tracking (the bias is O(D / N); compare runs with similar N).

A statistics file is a plain `.npz` (read with allow_pickle=False) holding `mu`, `sigma`, `count`, `backbone_id`,
`source_hash`, `crop_seconds` (the clip length analysed; 0 or absent: whole clips) and, optionally, per-prompt label probabilities for KL (`label_prompts` and `label_probs__<group>`).
Loading checks the backbone id, so numbers of different backbones are never compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from musicdiff.errors import DataError
from musicdiff.files import atomic_write_bytes

STATS_FORMAT = "musicdiff-reference-stats-v1"
_LABEL_PREFIX = "label_probs__"


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root through eigh (negative rounding eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: sum(sqrt(eig(S1^½ S2 S1^½))) = sum(svd(S1^½ S2^½))."""
    product = _sqrt_psd(sigma1) @ _sqrt_psd(sigma2)
    return float(np.sum(np.linalg.svd(product, compute_uv=False)))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2) in float64 (see the module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    sigma1, sigma2 = 0.5 * (sigma1 + sigma1.T), 0.5 * (sigma2 + sigma2.T)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(value, 0.0)  # a true distance is >= 0; rounding can leave -1e-12 for identical sets


def gaussian_fit(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with N - 1 normalisation) of [N, D] frames, float64."""
    x = np.asarray(frames, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"gaussian_fit: need [N >= 2, D] frames, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


@dataclasses.dataclass
class EmbeddingStats:
    """A Gaussian fit of pooled frame embeddings from one backbone, plus optional per-prompt label probabilities."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int  # frames pooled
    backbone_id: str
    source_hash: str = ""  # what the frames came from (file list hash); "" when unknown
    label_probs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # group -> prompt -> p
    crop_seconds: float = 0.0  # the length every clip was cropped to before analysis; 0 = whole clips

    @classmethod
    def from_frames(cls, frames: np.ndarray, backbone_id: str, source_hash: str = "",
                    label_probs: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> EmbeddingStats:
        mu, sigma = gaussian_fit(frames)
        probs = {g: {p: np.asarray(v, np.float64) for p, v in d.items()} for g, d in (label_probs or {}).items()}
        return cls(mu, sigma, int(np.shape(frames)[0]), backbone_id, source_hash, probs)

    @property
    def dim(self) -> int:
        return int(self.mu.size)

    def distance_to(self, other: EmbeddingStats) -> float:
        """FD to `other`; refuses statistics of another backbone (their numbers are not comparable)."""
        require_same_backbone(self.backbone_id, other.backbone_id, "Fréchet distance")
        if self.dim != other.dim:
            raise DataError(f"Fréchet distance: {self.dim}-d and {other.dim}-d statistics of backbone "
                            f"'{self.backbone_id}' differ in size; recompute the reference statistics")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the `.npz` atomically (musicdiff.files)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = dict(
            format=np.array(STATS_FORMAT), mu=self.mu.astype(np.float64), sigma=self.sigma.astype(np.float64),
            count=np.array(self.count, np.int64), backbone_id=np.array(self.backbone_id),
            source_hash=np.array(self.source_hash), crop_seconds=np.array(self.crop_seconds, np.float64))
        prompts = sorted({p for group in self.label_probs.values() for p in group})
        if prompts:
            arrays["label_prompts"] = np.array(prompts, dtype=np.str_)
            for group, by_prompt in self.label_probs.items():
                width = len(next(iter(by_prompt.values())))
                table = np.full((len(prompts), width), np.nan)
                for row, prompt in enumerate(prompts):
                    if prompt in by_prompt:
                        table[row] = by_prompt[prompt]
                arrays[_LABEL_PREFIX + group] = table
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect_backbone: str | None = None) -> EmbeddingStats:
        """Reads a statistics `.npz` (no pickle). With `expect_backbone`, a file of another backbone is refused."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such statistics file; compute it with launch.evaluate from a reference "
                            f"audio folder (config.reference.audio_dir) first")
        try:
            with np.load(path, allow_pickle=False) as data:
                stored = {name: data[name] for name in data.files}
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable .npz statistics file ({err})") from None
        missing = [k for k in ("mu", "sigma", "backbone_id") if k not in stored]
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)}; a musicdiff statistics file holds mu, sigma, "
                            f"count and backbone_id (files of other toolkits carry no backbone id: add one with "
                            f"musicdiff.eval.frechet.EmbeddingStats(...).save)")
        backbone = str(stored["backbone_id"])
        if expect_backbone is not None:
            require_same_backbone(expect_backbone, backbone, f"statistics file {path}")
        label_probs: dict[str, dict[str, np.ndarray]] = {}
        if "label_prompts" in stored:
            prompts = [str(p) for p in stored["label_prompts"]]
            for name, table in stored.items():
                if name.startswith(_LABEL_PREFIX):
                    label_probs[name[len(_LABEL_PREFIX):]] = {
                        p: row for p, row in zip(prompts, table) if np.all(np.isfinite(row))}
        return cls(np.asarray(stored["mu"], np.float64), np.asarray(stored["sigma"], np.float64),
                   int(stored.get("count", np.array(0))), backbone, str(stored.get("source_hash", np.array(""))),
                   label_probs, float(stored.get("crop_seconds", np.array(0.0))))


def require_same_backbone(expected: str, found: str, what: str) -> None:
    if expected != found:
        raise DataError(f"{what}: computed with backbone '{found}', but this evaluation uses '{expected}'; numbers "
                        f"from different backbones are not comparable: recompute it with '{expected}' or set "
                        f"config.backbone.name to match")


def source_hash(files: Iterable[str | os.PathLike], extra: Mapping[str, object] | None = None) -> str:
    """A hash of a file list (paths, sizes, modification times) and settings: the reference-statistics cache key."""
    digest = hashlib.sha256()
    for name in sorted(str(Path(f).resolve()) for f in files):
        stat = os.stat(name)
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps(dict(extra or {}), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def cache_path(cache_dir: str | os.PathLike, backbone_id: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone_id)
    return Path(cache_dir) / f"{safe}__{key}.npz"


def cached_stats(cache_dir: str | os.PathLike | None, backbone_id: str, key: str,
                 compute: Callable[[], EmbeddingStats]) -> tuple[EmbeddingStats, bool]:
    """(stats, was_cached): the cached file for (backbone, key) if present, else `compute()` saved there."""
    if cache_dir:
        path = cache_path(cache_dir, backbone_id, key)
        if path.is_file():
            stats = EmbeddingStats.load(path, expect_backbone=backbone_id)
            if stats.source_hash == key:
                return stats, True
    stats = compute()
    if cache_dir:
        stats.source_hash = key
        stats.save(cache_path(cache_dir, backbone_id, key))
    return stats, False


def pooled_stats(frame_sets: Sequence[np.ndarray], backbone_id: str, source: str = "") -> EmbeddingStats:
    """Statistics of every frame of every clip pooled (longer clips weigh more, as in stable-audio-metrics)."""
    if not frame_sets:
        raise DataError("no clips to compute embedding statistics from")
    frames = np.concatenate([np.asarray(f, np.float64).reshape(-1, np.shape(f)[-1]) for f in frame_sets])
    if frames.shape[0] < 2:
        raise DataError(f"only {frames.shape[0]} embedding frame: need at least 2 to fit a covariance; give more "
                        f"or longer clips")
    return EmbeddingStats.from_frames(frames, backbone_id, source)


class FrechetToReference:
    """FD of weighted resamples of one frame set against fixed reference statistics (the FD bootstrap).

    A resample that takes clip i w_i times pools its frames with weight w_i, which is the same Gaussian fit as
    concatenating the repeated clips (N = sum of weights, N - 1 normalisation). The trace term uses
    Tr((S1 S2)^(1/2)) = sum(svd(B)) with B = sqrt(w) (X - mu) S2^(1/2) / sqrt(N - 1), since B^T B = S2^½ S1 S2^½:
    exact without squaring (as frechet_distance) while there are fewer frames than dimensions, and X S2^(1/2) is
    computed once, so a resample costs one [frames, D] SVD (OpenL3 is 1024-d, a demo set ~100 frames). With more
    frames than dimensions the covariance is well determined and the eigenvalues of B^T B serve (rounding of order
    1e-8 per zero eigenvalue, far below a bootstrap interval's width)."""

    def __init__(self, frames: np.ndarray, reference: EmbeddingStats):
        self.frames = np.asarray(frames, np.float64)
        sigma = np.atleast_2d(np.asarray(reference.sigma, np.float64))
        self.sqrt_sigma = _sqrt_psd(0.5 * (sigma + sigma.T))
        self.projected = self.frames @ self.sqrt_sigma
        self.reference_mu = np.asarray(reference.mu, np.float64)
        self.reference_trace = float(np.trace(sigma))

    def distance(self, frame_weights: np.ndarray) -> float:
        """FD of the Gaussian fit of the frames, frame j counted `frame_weights[j]` times (integers >= 0)."""
        weights = np.asarray(frame_weights, np.float64)
        keep = weights > 0
        weights = weights[keep]
        total = float(weights.sum())
        if total < 2:
            raise DataError("Fréchet distance of a resample: fewer than 2 frames")
        frames = self.frames[keep]
        mu = weights @ frames / total
        trace = float(weights @ np.sum((frames - mu) ** 2, axis=1)) / (total - 1.0)
        product = np.sqrt(weights)[:, None] * (self.projected[keep] - mu @ self.sqrt_sigma)
        if product.shape[0] < product.shape[1]:
            singular = np.linalg.svd(product, compute_uv=False)
        else:  # more frames than dimensions: a tall SVD costs far more than the D x D Gram matrix's eigenvalues
            singular = np.sqrt(np.clip(np.linalg.eigvalsh(product.T @ product), 0.0, None))
        trace_sqrt = float(np.sum(singular)) / np.sqrt(total - 1.0)
        diff = mu - self.reference_mu
        return max(float(diff @ diff + trace + self.reference_trace - 2.0 * trace_sqrt), 0.0)

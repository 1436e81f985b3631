"""Label-distribution KL and the CLAP-style text/audio score, in float64 numpy (eval_and_control.md §A.2, §A.4).

KL follows stable-audio-metrics (KL_passt) exactly:
- per clip, the classifier's logits are **averaged over its windows, then a softmax** is taken over the classes
  (the AudioCraft/MusicGen convention; PaSST's native sigmoid is not used);
- per prompt id, KL(p_gen || p_ref) = sum_k p_gen,k (log p_gen,k - log(p_ref,k + 1e-6)), i.e. torch
  `kl_div(input=log(p_ref + 1e-6), target=p_gen, reduction="sum")` with 0 log 0 = 0: the generated distribution is
  the *target* p and the reference the model q;
- the metric is the mean over the prompt ids present in both sets (lower is better); identical distributions
  give sum p log(p / (p + 1e-6)), slightly below 0, as in the reference.
AudioCraft reports the other direction KL(p_ref || p_gen); it is returned beside the SA number as `kl_ref_gen`.
A backbone may have several label groups (the embedded evaluator: key, mode, tempo bucket, instruments): each
group is its own softmax distribution and the reported KL is the sum over groups (one group for PaSST).

CLAP score: the mean over prompts of cos(audio embedding, text embedding) with torch's eps 1e-8:
cos(x, y) = x·y / (max(|x|, eps) max(|y|, eps)) (higher is better).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import softmax, xlogy

KL_EPS = 1e-6
COSINE_EPS = 1e-8


def window_logits_to_probs(window_logits: np.ndarray) -> np.ndarray:
    """[windows, K] (or [K]) logits -> the clip's [K] distribution: softmax of the window-mean logits."""
    logits = np.asarray(window_logits, np.float64)
    if logits.ndim == 1:
        logits = logits[None]
    return softmax(logits.mean(axis=0))


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = KL_EPS) -> float:
    """KL(p || q) = sum p (log p - log(q + eps)), with 0 log 0 = 0 (torch kl_div with log(q + eps) as input)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape:
        raise ValueError(f"kl_divergence: distributions of {p.shape} and {q.shape} classes")
    return float(np.sum(xlogy(p, p) - p * np.log(q + eps)))


def paired_kl(generated: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The SA KL over prompt ids present in both maps: {kl, kl_ref_gen, pairs, per_prompt}.

    Each map sends a prompt id to that prompt's [K] distribution (several generations of one prompt: average their
    distributions before calling, or call per seed and average the results)."""
    shared = sorted(set(generated) & set(reference))
    if not shared:
        raise ValueError("paired_kl: no prompt id is in both the generated and the reference set")
    per_prompt = {pid: kl_divergence(generated[pid], reference[pid]) for pid in shared}
    backward = [kl_divergence(reference[pid], generated[pid]) for pid in shared]
    return dict(kl=float(np.mean(list(per_prompt.values()))), kl_ref_gen=float(np.mean(backward)),
                pairs=len(shared), per_prompt=per_prompt)


def grouped_paired_kl(generated: Mapping[str, Mapping[str, np.ndarray]],
                      reference: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, object]:
    """paired_kl for every label group both sides have; `kl` is the sum of the groups' KLs (see module docstring).

    Maps are group -> prompt id -> [K] distribution."""
    groups = [g for g in generated if g in reference]
    if not groups:
        raise ValueError(f"grouped_paired_kl: no label group in common (generated {sorted(generated)}, "
                         f"reference {sorted(reference)})")
    by_group = {g: paired_kl(generated[g], reference[g]) for g in groups}
    return dict(kl=float(sum(r["kl"] for r in by_group.values())),
                kl_ref_gen=float(sum(r["kl_ref_gen"] for r in by_group.values())),
                pairs=min(r["pairs"] for r in by_group.values()), groups=by_group)


def cosine_similarity(x: np.ndarray, y: np.ndarray, eps: float = COSINE_EPS) -> np.ndarray:
    """Row-wise cosine of [N, D] (or [D]) arrays, torch.nn.functional.cosine_similarity's eps handling."""
    x, y = np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.asarray(y, np.float64))
    if x.shape != y.shape:
        raise ValueError(f"cosine_similarity: shapes {x.shape} and {y.shape} differ")
    norms = np.maximum(np.linalg.norm(x, axis=-1), eps) * np.maximum(np.linalg.norm(y, axis=-1), eps)
    return np.sum(x * y, axis=-1) / norms


def clap_score(audio_embeddings: np.ndarray, text_embeddings: np.ndarray,
               prompt_ids: Sequence[str] | None = None) -> dict[str, object]:
    """Mean cosine of paired audio/text embeddings ([N, D] each, row i = prompt i): {clap_score, count, per_prompt}.

    With `prompt_ids`, several generations of one prompt are averaged per prompt first, so every prompt counts once.
    """
    cosines = cosine_similarity(audio_embeddings, text_embeddings)
    if prompt_ids is None:
        return dict(clap_score=float(cosines.mean()), count=int(cosines.size), per_prompt={})
    by_prompt: dict[str, list[float]] = {}
    for pid, value in zip(prompt_ids, cosines, strict=True):
        by_prompt.setdefault(pid, []).append(float(value))
    per_prompt = {pid: float(np.mean(values)) for pid, values in by_prompt.items()}
    return dict(clap_score=float(np.mean(list(per_prompt.values()))), count=len(per_prompt), per_prompt=per_prompt)

"""Inpainting / continuation masks for training (Stable Audio 3, spec §5): pure, jit-able JAX.

Convention: [B, L] float32 masks, 1 = provided context (kept, shown to the model), 0 = to generate. L is the latent
length; `valid` [B, L] (1 = a real latent frame, a prefix of each row) restricts every type but "full" to the valid
frames, so padding is never presented as context (spec §5, `mask_padding`). Each generator draws per row from its own
key, so a row's mask depends on its key and its valid length only.

Types (`MASK_TYPES`, in this order everywhere, e.g. the probabilities of `sample_masks`):
- "full": all 0, everything generated: text-to-audio (SA3's FULL_MASK).
- "causal": keep a prefix of n ~ U{0..V} frames (V = the row's valid frames), generate the rest: continuation.
- "spans": a generated total G = round(r·V) with r ~ U(0.2, 1.0) (at least 1 frame), in k spans, k drawn from
  weights [4, 2, 1, 1] over 1..4 (and at most G, and at most the context frames + 1 so spans stay apart), each one
  frame plus a share of the rest by normalised uniform weights with an integer fix-up (the remainder goes one frame
  each to the first parts); the context V − G is split into k + 1 gaps the same way, the k − 1 inner gaps at least
  one frame each, and laid out gap, span, gap, ..., span, gap. Spans never overlap or touch (SA3's RANDOM_SPANS;
  its placement differs: largest first at random tries).
- "segments": SA3's legacy RANDOM_SEGMENTS: n ~ U{1..10} segments, each of length U{1..max(1, ⌊V/n⌋)} at a start
  U{0..V − length}; overlaps allowed; the segments are generated, the rest of the valid frames kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

MASK_TYPES = ("full", "causal", "spans", "segments")
SPAN_COUNT_WEIGHTS = (4.0, 2.0, 1.0, 1.0)  # P(k spans) for k = 1..4 (SA3's RANDOM_SPANS)
SPAN_RATIO = (0.2, 1.0)  # the generated share of the valid frames, uniform in this range
MAX_SEGMENTS = 10


def _valid_rows(valid: jax.Array | None, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """(valid [B, L] float32, valid frame counts [B] int32); all frames when `valid` is None."""
    if valid is None:
        valid = jnp.ones((batch, length), jnp.float32)
    valid = jnp.asarray(valid).astype(jnp.float32)
    if valid.shape != (batch, length):
        raise ValueError(f"inpainting masks: valid has shape {valid.shape}; expected [{batch}, {length}]")
    return valid, jnp.sum(valid, axis=1).astype(jnp.int32)


def full_masks(key: jax.Array, batch: int, length: int, valid: jax.Array | None = None) -> jax.Array:
    """All zeros [B, L]: nothing provided, everything generated (text-to-audio). `key` and `valid` are unused."""
    del key, valid
    return jnp.zeros((batch, length), jnp.float32)


def causal_masks(key: jax.Array, batch: int, length: int, valid: jax.Array | None = None) -> jax.Array:
    """Keep a prefix of n ~ U{0..V} frames per row (V = valid frames), generate the rest."""
    valid, count = _valid_rows(valid, batch, length)
    prefix = jax.random.randint(key, (batch,), 0, count + 1)
    return (jnp.arange(length)[None, :] < prefix[:, None]).astype(jnp.float32) * valid


def split_integer(key: jax.Array, total: jax.Array, parts: jax.Array, max_parts: int) -> jax.Array:
    """`total` (scalar int) split into `parts` (scalar int, 1..max_parts) non-negative integers [max_parts] by
    normalised uniform weights: floor(total·w_i/Σw), then the remainder one each to the first parts. Entries from
    `parts` on are 0; the entries sum to `total` exactly."""
    active = jnp.arange(max_parts) < parts
    weights = jnp.where(active, jax.random.uniform(key, (max_parts,), minval=1e-3, maxval=1.0), 0.0)
    share = jnp.floor(total * weights / jnp.sum(weights)).astype(jnp.int32)
    remainder = total - jnp.sum(share)
    return share + (active & (jnp.arange(max_parts) < remainder)).astype(jnp.int32)


def _spans_row(key: jax.Array, count: jax.Array, length: int) -> jax.Array:
    """One row of "spans": [L] with 1 on the context gaps inside the first `count` frames."""
    ratio_key, number_key, span_key, gap_key = jax.random.split(key, 4)
    max_spans = len(SPAN_COUNT_WEIGHTS)
    ratio = jax.random.uniform(ratio_key, (), minval=SPAN_RATIO[0], maxval=SPAN_RATIO[1])
    generated = jnp.clip(jnp.round(ratio * count).astype(jnp.int32), 1, jnp.maximum(count, 1))
    context = jnp.maximum(count - generated, 0)
    drawn = 1 + jax.random.categorical(number_key, jnp.log(jnp.asarray(SPAN_COUNT_WEIGHTS)))
    spans_n = jnp.clip(drawn, 1, jnp.minimum(generated, context + 1))
    active = (jnp.arange(max_spans) < spans_n).astype(jnp.int32)
    spans = active + split_integer(span_key, generated - spans_n, spans_n, max_spans)  # [4], active ones >= 1
    inner = ((jnp.arange(max_spans + 1) >= 1) & (jnp.arange(max_spans + 1) < spans_n)).astype(jnp.int32)
    gaps = inner + split_integer(gap_key, context - jnp.sum(inner), spans_n + 1, max_spans + 1)  # [5]
    # Span j starts after gaps 0..j and spans 0..j-1.
    starts = jnp.cumsum(gaps[:max_spans]) + jnp.cumsum(spans) - spans
    frames = jnp.arange(length)[:, None]
    generate = jnp.any((frames >= starts[None, :]) & (frames < (starts + spans)[None, :]), axis=1)
    keep = (~generate) & (jnp.arange(length) < count) & (count > 0)
    return keep.astype(jnp.float32)


def span_masks(key: jax.Array, batch: int, length: int, valid: jax.Array | None = None) -> jax.Array:
    """Non-overlapping generated spans covering U(0.2, 1.0) of each row's valid frames (module docstring)."""
    valid, count = _valid_rows(valid, batch, length)
    rows = jax.vmap(_spans_row, in_axes=(0, 0, None))(jax.random.split(key, batch), count, length)
    return rows * valid


def _segments_row(key: jax.Array, count: jax.Array, length: int) -> jax.Array:
    number_key, length_key, start_key = jax.random.split(key, 3)
    n = jax.random.randint(number_key, (), 1, MAX_SEGMENTS + 1)
    longest = jnp.maximum(count // n, 1)
    sizes = jax.random.randint(length_key, (MAX_SEGMENTS,), 1, longest + 1)
    starts = jax.random.randint(start_key, (MAX_SEGMENTS,), 0, jnp.maximum(count - sizes, 0) + 1)
    active = jnp.arange(MAX_SEGMENTS) < n
    frames = jnp.arange(length)[:, None]
    generate = jnp.any(active[None, :] & (frames >= starts[None, :]) & (frames < (starts + sizes)[None, :]), axis=1)
    return ((~generate) & (jnp.arange(length) < count)).astype(jnp.float32)


def segment_masks(key: jax.Array, batch: int, length: int, valid: jax.Array | None = None) -> jax.Array:
    """SA3's legacy random segments (module docstring): up to 10 possibly overlapping generated segments."""
    valid, count = _valid_rows(valid, batch, length)
    rows = jax.vmap(_segments_row, in_axes=(0, 0, None))(jax.random.split(key, batch), count, length)
    return rows * valid


GENERATORS = {"full": full_masks, "causal": causal_masks, "spans": span_masks, "segments": segment_masks}


def mask_probabilities(probabilities: Mapping[str, float] | Sequence[float]) -> jax.Array:
    """[4] float32 in MASK_TYPES order from {type: p} (missing types 0) or a 4-sequence; checked and normalised."""
    if isinstance(probabilities, Mapping):
        unknown = sorted(set(probabilities) - set(MASK_TYPES))
        if unknown:
            raise ValueError(f"mask type {unknown[0]!r}: known types are {', '.join(MASK_TYPES)}")
        values = [float(probabilities.get(name, 0.0)) for name in MASK_TYPES]
    else:
        values = [float(p) for p in probabilities]
    if len(values) != len(MASK_TYPES) or min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"mask probabilities {values}: need {len(MASK_TYPES)} non-negative values "
                         f"({', '.join(MASK_TYPES)}) with a positive sum")
    total = sum(values)
    return jnp.asarray([v / total for v in values], jnp.float32)


def sample_masks(key: jax.Array, batch: int, length: int, probabilities: jax.Array,
                 valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(masks [B, L] float32, types [B] int32 indices into MASK_TYPES): per row a type drawn with `probabilities`
    ([4] in MASK_TYPES order, e.g. from `mask_probabilities`), then that type's mask. Every type is drawn for every
    row and the chosen one selected, so the shapes are static."""
    type_key, *keys = jax.random.split(key, 1 + len(MASK_TYPES))
    probabilities = jnp.asarray(probabilities, jnp.float32)
    types = jax.random.choice(type_key, len(MASK_TYPES), (batch,), p=probabilities / jnp.sum(probabilities))
    candidates = jnp.stack([GENERATORS[name](k, batch, length, valid) for name, k in zip(MASK_TYPES, keys)])
    masks = jnp.take_along_axis(candidates, types[None, :, None], axis=0)[0]
    return masks, types.astype(jnp.int32)


__all__ = ["GENERATORS", "MASK_TYPES", "causal_masks", "full_masks", "mask_probabilities", "sample_masks",
           "segment_masks", "span_masks", "split_integer"]

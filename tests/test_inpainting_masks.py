"""Inpainting mask generators (diffusion/inpainting_masks.py): shapes, closed forms, layout rules, statistics, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicdiff.diffusion.inpainting_masks import (MASK_TYPES, causal_masks, full_masks, mask_probabilities,
                                                  sample_masks, segment_masks, span_masks, split_integer)

LENGTH = 48
VALID_LENGTHS = np.array([48, 30, 7, 1, 0, 20])


def valid_rows(lengths=VALID_LENGTHS, length=LENGTH):
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def zero_runs(row: np.ndarray, valid_count: int) -> list[tuple[int, int]]:
    """(start, end) of each run of zeros inside the first valid_count frames."""
    runs, start = [], None
    for i in range(valid_count):
        if row[i] == 0 and start is None:
            start = i
        if row[i] != 0 and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, valid_count))
    return runs


@pytest.mark.parametrize("generator", [full_masks, causal_masks, span_masks, segment_masks])
def test_shapes_values_and_no_context_in_padding(generator):
    valid = valid_rows()
    masks = np.asarray(generator(jax.random.key(0), len(VALID_LENGTHS), LENGTH, jnp.asarray(valid)))
    assert masks.shape == (len(VALID_LENGTHS), LENGTH) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert not np.any(masks[valid == 0]), "padding must never be presented as context"
    no_valid = np.asarray(generator(jax.random.key(1), 2, LENGTH))  # valid=None: every frame is valid
    assert no_valid.shape == (2, LENGTH)


def test_full_is_all_zero():
    np.testing.assert_array_equal(np.asarray(full_masks(jax.random.key(3), 4, LENGTH, valid_rows()[:4])),
                                  np.zeros((4, LENGTH), np.float32))


def test_causal_keeps_a_uniform_prefix_of_the_valid_frames():
    rows, valid_count = 4000, 4
    valid = valid_rows([valid_count] * rows, 8)
    masks = np.asarray(causal_masks(jax.random.key(0), rows, 8, jnp.asarray(valid)))
    prefix = masks.sum(axis=1).astype(int)
    # closed form: row = [1]*n + [0]*(8-n), n in 0..4
    expected = (np.arange(8)[None, :] < prefix[:, None]).astype(np.float32)
    np.testing.assert_array_equal(masks, expected)
    counts = np.bincount(prefix, minlength=valid_count + 1)
    assert len(counts) == valid_count + 1  # never longer than the valid frames
    # U{0..4}: each value has probability 1/5 (standard deviation of a frequency ~0.0063 at 4000 rows)
    np.testing.assert_allclose(counts / rows, np.full(valid_count + 1, 0.2), atol=0.03)


def test_spans_do_not_overlap_and_cover_the_ratio():
    rows = 3000
    lengths = np.concatenate([np.full(rows - 3, 200), [1, 2, 5]])
    valid = valid_rows(lengths, 200)
    masks = np.asarray(span_masks(jax.random.key(7), rows, 200, jnp.asarray(valid)))
    span_counts = []
    for row, count in zip(masks, lengths):
        runs = zero_runs(row, int(count))
        generated = sum(end - start for start, end in runs)
        assert 1 <= len(runs) <= 4
        assert generated == count - row[:count].sum()
        # the generated share: round(r·V) with r in [0.2, 1.0], at least one frame
        assert max(1, np.floor(0.2 * count)) <= generated <= count
        span_counts.append(len(runs))
    # span count weights [4, 2, 1, 1] over 1..4 (rows of 200 frames have room for 4 spans unless r is near 1)
    frequencies = np.bincount(span_counts[:rows - 3], minlength=5)[1:] / (rows - 3)
    np.testing.assert_allclose(frequencies, [0.5, 0.25, 0.125, 0.125], atol=0.04)
    ratios = 1.0 - masks[:rows - 3].sum(axis=1) / 200
    assert 0.2 - 0.005 <= ratios.min() and ratios.max() <= 1.0
    assert abs(ratios.mean() - 0.6) < 0.02  # U(0.2, 1.0) has mean 0.6


def test_segments_generate_bounded_regions_inside_the_valid_frames():
    rows = 500
    lengths = np.full(rows, 40)
    masks = np.asarray(segment_masks(jax.random.key(5), rows, LENGTH, jnp.asarray(valid_rows(lengths))))
    generated = 40 - masks[:, :40].sum(axis=1)
    # n segments of at most floor(40/n) frames each: 1 <= generated <= 40; overlaps make some rows less
    assert generated.min() >= 1 and generated.max() <= 40
    assert np.all(masks[:, 40:] == 0)
    # one segment of length U{1..40} (n = 1, probability 1/10) is the only way to generate more than 20 in one run
    assert 0 < np.mean(generated) < 40


def test_split_integer_sums_exactly():
    for seed in range(20):
        key = jax.random.key(seed)
        total, parts = seed * 7 + 3, 1 + seed % 5
        split = np.asarray(split_integer(key, jnp.int32(total), jnp.int32(parts), 5))
        assert split.sum() == total and np.all(split >= 0) and np.all(split[parts:] == 0)


def test_sampler_respects_probabilities_and_is_deterministic_and_jittable():
    rows = 4000
    probabilities = mask_probabilities({"full": 0.5, "causal": 0.2, "spans": 0.2, "segments": 0.1})
    np.testing.assert_allclose(np.asarray(probabilities), [0.5, 0.2, 0.2, 0.1], rtol=1e-6)
    valid = jnp.asarray(valid_rows(np.full(rows, 24), 32))
    masks, types = sample_masks(jax.random.key(11), rows, 32, probabilities, valid)
    masks, types = np.asarray(masks), np.asarray(types)
    frequencies = np.bincount(types, minlength=4) / rows
    np.testing.assert_allclose(frequencies, [0.5, 0.2, 0.2, 0.1], atol=0.03)  # 4 standard deviations or more
    assert not masks[types == MASK_TYPES.index("full")].any()
    causal = masks[types == MASK_TYPES.index("causal")]
    np.testing.assert_array_equal(causal, np.sort(causal, axis=1)[:, ::-1])  # prefixes
    jitted = jax.jit(sample_masks, static_argnums=(1, 2))(jax.random.key(11), rows, 32, probabilities, valid)
    np.testing.assert_array_equal(np.asarray(jitted[0]), masks)
    np.testing.assert_array_equal(np.asarray(jitted[1]), types)
    again = sample_masks(jax.random.key(11), rows, 32, probabilities, valid)
    np.testing.assert_array_equal(np.asarray(again[0]), masks)
    only_causal, kinds = sample_masks(jax.random.key(2), 16, 32, mask_probabilities([0, 1, 0, 0]))
    assert np.all(np.asarray(kinds) == 1)


def test_probability_errors():
    with pytest.raises(ValueError, match="mask type 'holes'"):
        mask_probabilities({"holes": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        mask_probabilities([0.5, -0.1, 0.3, 0.3])
    with pytest.raises(ValueError, match="positive sum"):
        mask_probabilities({"full": 0.0})

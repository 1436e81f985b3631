"""Number-aware token embeddings for the embedded text encoder.

A caption's tempo is a number ("at 130 BPM"). With one token per digit (the caption tokenizer's `split_digits`) the
encoder sees "1", "3", "0" and must learn place value from the diffusion loss alone; the demo's DiT never learnt
tempo that way (../shared/reviews/demo-learnability-2026-12-06.md). Here every digit token also receives the value
of the whole number it belongs to, as the Fourier features SAO uses for seconds_total (NumberConditioner), so 130
lies next to 120 and 140 from the first step. The values are computed from the token ids inside the model (no new
data fields: latents precomputed with token ids keep working), given the ids of the ten digit tokens, which
training reads from the run's tokenizer (`digit_token_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.errors import ConfigError
from musicdiff.models.number_embedding import NumberConditioner
from musicdiff.models.text_encoder.t5 import T5Encoder, T5EncoderConfig
from musicdiff.models.text_encoder.tokenizers import TextTokenizer

DIGITS = "0123456789"


def digit_token_ids(tokenizer: TextTokenizer, where: str) -> list[int]:
    """The ids of the tokens "0".."9"; the tokenizer must split numbers into single digits (built with
    `split_digits=True`), or whole-number tokens would carry no value."""
    vocab = tokenizer.tokenizer.get_vocab()
    missing = [d for d in DIGITS if d not in vocab]
    pieces = tokenizer.tokenizer.tokenize("1234567890")
    if missing or pieces != list("1234567890"):
        raise ConfigError(f"{where}: the number embedding needs a caption tokenizer with one token per digit; this "
                          f"one splits '1234567890' into {pieces}. Precompute the latents with "
                          f"--config.text_encoder.split_digits=True")
    return [int(vocab[d]) for d in DIGITS]


def number_values(input_ids: jax.Array, digit_ids: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """`input_ids` [B, T] -> (values float32 [B, T], is_digit bool [B, T]): every token of a run of consecutive digit
    tokens gets the run's whole value read in base 10 ("1","3","0" -> 130 at all three); other tokens get 0."""
    table = np.full(max(digit_ids) + 1, -1, np.int32)
    table[np.asarray(digit_ids)] = np.arange(len(digit_ids))
    ids = jnp.asarray(input_ids)
    in_table = (ids >= 0) & (ids < table.size)
    digit = jnp.where(in_table, jnp.asarray(table)[jnp.clip(ids, 0, table.size - 1)], -1)
    is_digit = digit >= 0

    def read(prefix, column):  # left to right: the value of the digits read so far in this run
        d, on = column
        prefix = jnp.where(on, prefix * 10.0 + d.astype(jnp.float32), 0.0)
        return prefix, prefix

    _, prefixes = jax.lax.scan(read, jnp.zeros(ids.shape[0], jnp.float32), (digit.T, is_digit.T))

    def spread(carry, column):  # right to left: a run's last prefix is its value; hand it to the run's earlier digits
        value_right, on_right = carry
        prefix, on = column
        value = jnp.where(on, jnp.where(on_right, value_right, prefix), 0.0)
        return (value, on), value

    start = (jnp.zeros(ids.shape[0], jnp.float32), jnp.zeros(ids.shape[0], bool))
    _, values = jax.lax.scan(spread, start, (prefixes, is_digit.T), reverse=True)
    return values.T, is_digit


class NumberAwareT5Encoder(T5Encoder):
    """The embedded T5 encoder plus, on digit tokens, NumberConditioner(value of their number) added to the token
    embedding. Numbers are clipped to [0, number_max]; a fraction like 4.5 reads as the two numbers 4 and 5."""

    def __init__(self, config: T5EncoderConfig, *, number_max: float, digit_ids: Sequence[int] | None,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if digit_ids is not None and len(digit_ids) != len(DIGITS):
            raise ConfigError(f"digit_ids={list(digit_ids)}: expected the ids of the ten tokens 0..9")
        self.numbers = NumberConditioner(config.d_model, 0.0, float(number_max), rngs=rngs, dtype=dtype)
        self.digit_ids = None if digit_ids is None else tuple(int(i) for i in digit_ids)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *, rngs: nnx.Rngs | None = None,
                 token_offsets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        if self.digit_ids is None:
            raise ConfigError("the prompt conditioner's number embedding has no digit_ids: training fills them from "
                              "the latents' caption tokenizer (EmbeddedKind.resolve_training); set "
                              "conditioner prompt config.digit_ids to the ids of the tokens 0..9")
        values, is_digit = number_values(input_ids, self.digit_ids)
        batch, length = input_ids.shape
        tokens, _ = self.numbers(values.reshape(-1))
        offsets = tokens.reshape(batch, length, -1) * is_digit[..., None].astype(tokens.dtype)
        if token_offsets is not None:
            offsets = offsets + token_offsets
        return super().__call__(input_ids, attention_mask, rngs=rngs, token_offsets=offsets)

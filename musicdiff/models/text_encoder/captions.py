"""Captions through a text encoder: each distinct caption encoded once, in fixed-size batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicdiff.models.text_encoder.tokenizers import TextTokenizer


@dataclasses.dataclass
class CaptionEmbeddings:
    """Encoder outputs of distinct captions: embeddings [N, T, D], mask [N, T] bool, caption -> row."""

    embeddings: np.ndarray
    mask: np.ndarray
    index: dict[str, int]

    def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray([self.index[c] for c in captions], dtype=np.int64)
        return self.embeddings[rows], self.mask[rows]


@nnx.jit
def encode_token_batch(encoder: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """`encoder(input_ids, attention_mask)` compiled once per shape; module level, so repeated calls (one per
    precompute shard, one per prompt batch) reuse the compiled program."""
    return encoder(input_ids, attention_mask)


def encode_captions(captions: Iterable[str], tokenizer: TextTokenizer, encoder: nnx.Module, *, batch_size: int = 32,
                    dtype: Any = np.float32) -> CaptionEmbeddings:
    """Runs the encoder once per distinct caption (in first-seen order), in fixed-size batches so that one compiled
    program serves every batch; the last batch is padded with empty captions and trimmed."""
    distinct = list(dict.fromkeys(captions))
    index = {caption: row for row, caption in enumerate(distinct)}
    embeddings, masks = [], []
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start:start + batch_size]
        tokens = tokenizer(chunk + [""] * (batch_size - len(chunk)))
        out, mask = encode_token_batch(encoder, jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]))
        embeddings.append(np.asarray(out.astype(dtype))[: len(chunk)])
        masks.append(np.asarray(mask)[: len(chunk)])
    width = getattr(getattr(encoder, "config", None), "d_model", 0)
    if not distinct:
        return CaptionEmbeddings(np.zeros((0, tokenizer.max_length, width), dtype), np.zeros((0, tokenizer.max_length),
                                 bool), index)
    return CaptionEmbeddings(np.concatenate(embeddings), np.concatenate(masks), index)


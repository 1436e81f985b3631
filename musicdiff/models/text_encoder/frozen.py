"""Frozen text encoders whose outputs are stored by precompute: what every such kind shares.

Precompute stores each caption's embeddings of its real tokens (`prompt_embeddings` [n, D]); training pads them to
`max_length` with a mask (`prompt_embeddings` [T, D], `prompt_mask` [T]); generation runs the same encoder on the
prompts, so it sees exactly what training saw. The conditioner owns no encoder. A subclass says how to build and load
its encoder, how wide its outputs are and which checkpoint it names.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from musicdiff.config import to_dict
from musicdiff.models.text_encoder.captions import encode_captions, encode_token_batch
from musicdiff.models.text_encoder.registry import CaptionFieldsFn, PromptEncoderFn, TextEncoderKind
from musicdiff.parallel.sharding import Rules, sharding_context, unsharded


class FrozenEmbeddingsKind(TextEncoderKind):
    batch_keys = {"embeddings": "prompt_embeddings", "mask": "prompt_mask"}

    @abc.abstractmethod
    def embedding_dim(self, section: ml_collections.ConfigDict) -> int:
        """The width of the encoder's outputs."""

    @abc.abstractmethod
    def checkpoint_id(self, section: ml_collections.ConfigDict) -> str:
        """What identifies the weights in the manifest (a path or hub name)."""

    def prompt_encoder(self, section: ml_collections.ConfigDict, key: str) -> PromptEncoderFn:
        encoder, tokenizer = self.load(section, nnx.Rngs(0))

        def encode(prompts: Sequence[str]) -> dict[str, np.ndarray]:
            tokens = tokenizer(list(prompts))
            with unsharded():  # generation's prompts: one program, laid out by its inputs
                embeddings, mask = encode_token_batch(encoder, jnp.asarray(tokens["input_ids"]),
                                                      jnp.asarray(tokens["attention_mask"]))
            return {"embeddings": np.asarray(embeddings, np.float32), "mask": np.asarray(mask)}

        return encode

    def prepare_outputs(self, section: ml_collections.ConfigDict, out: Path, captions: Sequence[str],
                        resuming: bool) -> None:
        """Nothing to write: the weights come from the checkpoint the section names."""

    def caption_fields(self, section: ml_collections.ConfigDict, out: Path, *, mesh: Mesh, rules: Rules,
                       batch_size: int, dtype: Any) -> CaptionFieldsFn:
        encoder, tokenizer = self.load(section, nnx.Rngs(0), mesh=mesh, rules=rules)

        def fields(captions: list[str]) -> dict[str, dict[str, np.ndarray]]:
            with sharding_context(mesh, rules):  # the encoder was restored onto precompute's mesh
                table = encode_captions(captions, tokenizer, encoder, batch_size=batch_size, dtype=dtype)
            stored = {}
            for caption, row in table.index.items():
                real = int(table.mask[row].sum())  # right-padded: the real tokens are a prefix
                stored[caption] = {self.batch_keys["embeddings"]: table.embeddings[row, :real]}
            return stored

        return fields

    def manifest_entry(self, section: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
        return {"name": self.name, "id": self.checkpoint_id(section), "config": to_dict(section),
                "max_length": int(section.max_length), "embedding_dim": self.embedding_dim(section)}

    def record_fields(self, record: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
        tokens = np.asarray(record[self.batch_keys["embeddings"]], np.float32)
        length, width = int(entry["max_length"]), int(entry.get("embedding_dim") or 0)
        embeddings = np.zeros((length, width), np.float32)
        embeddings[: len(tokens)] = tokens
        mask = np.zeros(length, bool)
        mask[: len(tokens)] = True
        return {self.batch_keys["embeddings"]: embeddings, self.batch_keys["mask"]: mask}

    def resolve_training(self, prompt_section: ml_collections.ConfigDict, entry: Mapping[str, Any],
                         conditioner_config: Mapping[str, Any]) -> None:
        """Nothing to take over: the prompt encoder section names its own checkpoint."""

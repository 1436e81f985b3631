"""Prompts to the prompt conditioner's inputs, as a diffusion config's `prompt_encoder` section says.

- "t5": a frozen T5 (local Hugging Face directory or hub name) -> {"embeddings" [B, T, D], "mask" [B, T]}, as
  precompute stores them, so generation sees exactly what training saw.
- "embedded": the caption tokenizer saved with the run -> {"input_ids", "attention_mask"}; the trainable encoder
  itself lives inside the conditioner's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicdiff.errors import ConfigError
from musicdiff.parallel.sharding import unsharded
from musicdiff.models.text_encoder import TextTokenizer, load_caption_tokenizer, load_text_encoder


class PromptEncoder:
    def __init__(self, section: ml_collections.ConfigDict):
        self.kind = section.name
        if self.kind == "t5":
            self.encoder, self.tokenizer = load_text_encoder(section, nnx.Rngs(0))
            self._forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
        elif self.kind == "embedded":
            if not section.get("tokenizer_path"):
                raise ConfigError("config.prompt_encoder.tokenizer_path is empty: the run's tokenizer directory "
                                  "(written by launch.precompute_latents and copied into the training workdir)")
            self.encoder = None
            self.tokenizer: TextTokenizer = load_caption_tokenizer(section.tokenizer_path, int(section.max_length))
        else:
            raise ConfigError(f"config.prompt_encoder.name={self.kind!r}: expected 't5' or 'embedded'")

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        tokens = self.tokenizer(list(prompts))
        if self.kind == "embedded":
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        with unsharded():
            embeddings, mask = self._forward(self.encoder, jnp.asarray(tokens["input_ids"]),
                                             jnp.asarray(tokens["attention_mask"]))
        return {"embeddings": np.asarray(embeddings, np.float32), "mask": np.asarray(mask)}

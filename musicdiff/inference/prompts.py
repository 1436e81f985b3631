"""Prompts to the prompt conditioner's inputs, as a diffusion config's `prompt_encoder` section says; the section's
`name` picks a registered text-encoder kind (musicdiff/models/text_encoder/registry.py). The built-in ones:

- "t5": a frozen T5 (local Hugging Face directory or hub name) -> {"embeddings" [B, T, D], "mask" [B, T]}, as
  precompute stores them, so generation sees exactly what training saw.
- "embedded": the caption tokenizer saved with the run -> {"input_ids", "attention_mask"}; the trainable encoder
  itself lives inside the conditioner's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from musicdiff.models.text_encoder import text_encoder_kind


class PromptEncoder:
    def __init__(self, section: ml_collections.ConfigDict):
        self.kind = section.name
        self._encode = text_encoder_kind(self.kind, "config.prompt_encoder.name").prompt_encoder(
            section, "config.prompt_encoder.name")

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        return self._encode(prompts)

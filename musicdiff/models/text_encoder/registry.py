"""Text-encoder kinds: a `text_encoder` / `prompt_encoder` section's `name` (and a prompt conditioner's `type`) picks
one registered `TextEncoderKind`, which knows everything that differs between encoders.

A kind is asked, at each stage, for:
- models: `build` (random init, for describe and tests), `load` (the encoder and tokenizer a section selects) and
  `conditioner_encoder` (the token width the prompt conditioner receives and the encoder it owns, if any);
- precompute: `prepare_outputs` (files the kind writes before the shards, e.g. a caption tokenizer),
  `caption_fields` (the per-caption record fields) and `manifest_entry` (manifest.json's `text_encoder`);
- training: `record_fields` (record -> fixed-shape example fields, named by `batch_keys`) and `resolve_training`
  (what the prompt encoder section takes from the latents' manifest);
- generation: `prompt_encoder` (prompts -> the conditioner's prompt inputs).

A new encoder plugs in by subclassing `TextEncoderKind` (or `frozen.FrozenEmbeddingsKind`, for an encoder whose
outputs are stored by precompute) and decorating it with `@register_text_encoder`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from musicdiff.errors import ConfigError, DataError
from musicdiff.models import registry as model_registry
from musicdiff.parallel.sharding import DEFAULT_SHARDING_RULES, Rules

# Prompts -> the prompt conditioner's inputs ({"embeddings", "mask"} or {"input_ids", "attention_mask"}, NumPy).
PromptEncoderFn = Callable[[Sequence[str]], dict[str, np.ndarray]]
# Distinct captions of one shard -> {caption: record fields}.
CaptionFieldsFn = Callable[[list[str]], dict[str, dict[str, np.ndarray]]]


class TextEncoderKind(abc.ABC):
    """Everything that depends on which text encoder a run uses. Instances are stateless; sections are passed in."""

    name: ClassVar[str]
    # Prompt conditioner input -> latent batch key holding it (data_pipelines.latent_source, training/diffusion.py).
    batch_keys: ClassVar[Mapping[str, str]]

    @abc.abstractmethod
    def build(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        """A randomly initialised encoder of the configured size (model registry: describe, tests)."""

    @abc.abstractmethod
    def load(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
             rules: Rules = DEFAULT_SHARDING_RULES) -> tuple[nnx.Module, Any]:
        """The encoder and tokenizer `section` selects (frozen weights, or a fresh trainable encoder)."""

    @abc.abstractmethod
    def conditioner_encoder(self, entry_id: str, config: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any
                            ) -> tuple[int, nnx.Module | None]:
        """For a prompt conditioner entry of this type: the width of the text tokens it receives, and the encoder it
        owns and trains (None: the encoder is frozen and its outputs, or the encoder itself, come at call time)."""

    @abc.abstractmethod
    def prompt_encoder(self, section: ml_collections.ConfigDict, key: str) -> PromptEncoderFn:
        """Prompts -> the conditioner's prompt inputs at generation, as training saw them; `key` names the section in
        errors."""

    @abc.abstractmethod
    def prepare_outputs(self, section: ml_collections.ConfigDict, out: Path, captions: Sequence[str],
                        resuming: bool) -> None:
        """Precompute, process 0, before any shard: write what `caption_fields` and `manifest_entry` read from `out`
        (`resuming`: a run with the same plan left outputs there, to be kept)."""

    @abc.abstractmethod
    def caption_fields(self, section: ml_collections.ConfigDict, out: Path, *, mesh: Mesh, rules: Rules,
                       batch_size: int, dtype: Any) -> CaptionFieldsFn:
        """Precompute: the function giving each distinct caption of a shard its record fields."""

    @abc.abstractmethod
    def manifest_entry(self, section: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
        """manifest.json's `text_encoder`: at least name, id, config and max_length."""

    @abc.abstractmethod
    def record_fields(self, record: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One latent record's text fields as fixed-shape example fields (keys: the values of `batch_keys`); `entry`
        is the manifest's `text_encoder`."""

    @abc.abstractmethod
    def resolve_training(self, prompt_section: ml_collections.ConfigDict, entry: Mapping[str, Any],
                         conditioner_config: Mapping[str, Any]) -> None:
        """Diffusion training: fills `prompt_section` from the latents' manifest entry and checks that the prompt
        conditioner's `config` agrees with it (ConfigError otherwise)."""


_KINDS: dict[str, TextEncoderKind] = {}


def register_text_encoder(kind_class: type[TextEncoderKind]) -> type[TextEncoderKind]:
    """Class decorator: registers an instance under `kind_class.name`, and its `build` as the model builder of that
    name (so launch.describe and registry.build know the encoder)."""
    kind = kind_class()
    _KINDS[kind.name] = kind
    model_registry.register(kind.name)(kind.build)
    return kind_class


def text_encoder_names() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def is_text_encoder(name: str) -> bool:
    return name in _KINDS


def text_encoder_kind(name: str, key: str = "config.text_encoder.name") -> TextEncoderKind:
    """The kind registered as `name`; `key` is the config key that named it, for the error."""
    if name not in _KINDS:
        raise ConfigError(f"{key}={name!r}: no such text encoder; registered text encoders: "
                          f"{', '.join(text_encoder_names())}")
    return _KINDS[name]


def load_text_encoder(section: ml_collections.ConfigDict, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
                      rules: Rules = DEFAULT_SHARDING_RULES, key: str = "config.text_encoder.name"
                      ) -> tuple[nnx.Module, Any]:
    """The encoder and tokenizer a `text_encoder` config section selects (see the kinds' `load`)."""
    return text_encoder_kind(section.name, key).load(section, rngs, mesh=mesh, rules=rules)


def prompt_from_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt conditioner's inputs from a latent batch, by whichever kind's batch keys it holds."""
    for kind in _KINDS.values():
        if all(batch_key in batch for batch_key in kind.batch_keys.values()):
            return {name: batch[batch_key] for name, batch_key in kind.batch_keys.items()}
    raise DataError(f"latent batch has no prompt (keys: {sorted(batch)}); precompute it with "
                    f"launch.precompute_latents")

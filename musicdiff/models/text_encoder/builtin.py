"""The text encoders of this codebase, registered under the names config sections use:

- "t5": a frozen T5 from a local Hugging Face directory or hub name (`path`); precompute stores its embeddings.
- "t5gemma": a frozen T5Gemma encoder (Stable Audio 3's, text_encoder/t5gemma.py) from `path`, used as "t5" is;
  its prompt conditioner entry usually sets `padding_mode="learned"` (models/conditioning.py), as Stable Audio 3 does.
- "embedded": the same architecture, small and randomly initialised, owned and trained by the prompt conditioner;
  precompute builds a byte-level BPE tokenizer from the dataset captions into OUT/tokenizer and stores token ids.
  With `number_max` > 0 in the conditioner entry, digit tokens also carry the value of their number
  (text_encoder/numbers.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from musicdiff.config import to_dict
from musicdiff.errors import ConfigError
from musicdiff.files import atomic_directory, sha256_file
from musicdiff.models.text_encoder.frozen import FrozenEmbeddingsKind
from musicdiff.models.text_encoder.numbers import NumberAwareT5Encoder, digit_token_ids
from musicdiff.models.text_encoder.hf_checkpoint import load_t5_encoder, resolve_checkpoint_dir
from musicdiff.models.text_encoder.registry import (CaptionFieldsFn, PromptEncoderFn, TextEncoderKind,
                                                    register_text_encoder)
from musicdiff.models.text_encoder.t5 import T5Encoder, T5EncoderConfig
from musicdiff.models.text_encoder.t5gemma import T5GemmaEncoder, T5GemmaEncoderConfig, load_t5gemma_encoder
from musicdiff.models.text_encoder.tokenizers import (TextTokenizer, build_caption_tokenizer,
                                                      load_caption_tokenizer)
from musicdiff.parallel.sharding import DEFAULT_SHARDING_RULES, Rules

# The embedded encoder's caption tokenizer, relative to the precompute workdir (data_pipelines.latent_source layout).
TOKENIZER_DIR = "tokenizer"
# Output widths of the T5 models the reference's T5Conditioner accepts.
T5_DIMS = {
    "t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024,
    "google/t5-v1_1-xl": 2048, "google/t5-v1_1-xxl": 4096,
    "google/flan-t5-small": 512, "google/flan-t5-base": 768, "google/flan-t5-large": 1024,
    "google/flan-t5-xl": 2048, "google/flan-t5-xxl": 4096,
}
# Output width of Stable Audio 3's T5Gemma encoder (spec §3.3); other checkpoints: set the conditioner's `dim`.
T5GEMMA_DIMS = {"google/t5gemma-b-b-ul2": 768}


def _dtype(section: ml_collections.ConfigDict, key: str) -> Any:
    name = section.get(key, "float32")
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.text_encoder.{key}={name!r}: expected float32, bfloat16 or float16")
    return jnp.dtype(name)


def _sizes(section: ml_collections.ConfigDict, width_key: str) -> dict[str, Any]:
    """The section's values; a section without sizes (no `width_key`) takes them from `path`/config.json (a T5Gemma
    config.json's sizes sit in its `encoder` sub-config, which the section's own keys then override)."""
    values = dict(section)
    if width_key not in values and values.get("path"):
        directory = resolve_checkpoint_dir(values["path"])
        loaded = json.loads((directory / "config.json").read_text())
        values = {**loaded, **loaded.get("encoder", {}), **values}
        values.pop("encoder", None)
    return values


def encoder_config_from(section: ml_collections.ConfigDict) -> T5EncoderConfig:
    """Sizes from the config section; a "t5" section without sizes reads them from `path`/config.json."""
    return T5EncoderConfig.from_mapping(_sizes(section, "d_model"))


def _check_sizes(section: ml_collections.ConfigDict, loaded: Any, skip: tuple[str, ...] = ()) -> None:
    """Sizes the section gives must be those of the checkpoint at `path` (`loaded`: its encoder config)."""
    for field in dataclasses.fields(loaded):
        if field.name not in skip and field.name in section:
            value = getattr(loaded, field.name)
            given = tuple(section[field.name]) if isinstance(value, tuple) else section[field.name]
            if given != value:
                raise ConfigError(f"config.text_encoder.{field.name}={section[field.name]!r}: the checkpoint at "
                                  f"{section.path} has {value!r}; use --config.text_encoder.{field.name}={value!r}")


def _conditioner_dim(entry_id: str, config: Mapping[str, Any], name_key: str, default_name: str,
                     dims: Mapping[str, int]) -> int:
    """A frozen encoder's token width: the entry's `dim`, else the width of the model its `name_key` names."""
    name = config.get(name_key, default_name)
    dim = config.get("dim", dims.get(name))
    if dim is None:
        raise ConfigError(f"conditioning '{entry_id}': unknown {name_key} {name!r}; set config.dim to its "
                          f"width or use one of {', '.join(dims)}")
    return dim


def _sized_encoder(section: ml_collections.ConfigDict, rngs: nnx.Rngs) -> T5Encoder:
    return T5Encoder(encoder_config_from(section), rngs=rngs, dtype=_dtype(section, "dtype"),
                     param_dtype=_dtype(section, "param_dtype"))


@register_text_encoder
class T5Kind(FrozenEmbeddingsKind):
    name = "t5"

    def build(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs) -> T5Encoder:
        """Randomly initialised T5 of the configured size (describe, tests); real weights come from `load`."""
        return _sized_encoder(section, rngs)

    def load(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
             rules: Rules = DEFAULT_SHARDING_RULES) -> tuple[T5Encoder, TextTokenizer]:
        """Frozen weights from `path`; sizes in the section, if given, must agree with its config.json."""
        encoder = load_t5_encoder(section.path, mesh=mesh, rules=rules, dtype=_dtype(section, "dtype"),
                                  param_dtype=_dtype(section, "param_dtype"))
        _check_sizes(section, encoder.config, skip=("dropout_rate",))
        return encoder, TextTokenizer(section.path, section.max_length)

    def conditioner_encoder(self, entry_id: str, config: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any
                            ) -> tuple[int, None]:
        return _conditioner_dim(entry_id, config, "t5_model_name", "t5-base", T5_DIMS), None

    def embedding_dim(self, section: ml_collections.ConfigDict) -> int:
        return encoder_config_from(section).d_model

    def checkpoint_id(self, section: ml_collections.ConfigDict) -> str:
        return section.path


@register_text_encoder
class T5GemmaKind(FrozenEmbeddingsKind):
    """Stable Audio 3's prompt encoder: padded/truncated to `max_length` tokens (SA3: 256) by the checkpoint's own
    tokenizer; its prompt conditioner entry sets `padding_mode="learned"` (conditioning.TextConditioner)."""

    name = "t5gemma"

    def build(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs) -> T5GemmaEncoder:
        """Randomly initialised T5Gemma encoder of the configured size (describe, tests); weights come from `load`."""
        return T5GemmaEncoder(T5GemmaEncoderConfig.from_mapping(_sizes(section, "hidden_size")), rngs=rngs,
                              dtype=_dtype(section, "dtype"), param_dtype=_dtype(section, "param_dtype"))

    def load(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
             rules: Rules = DEFAULT_SHARDING_RULES) -> tuple[T5GemmaEncoder, TextTokenizer]:
        """Frozen weights and tokenizer from `path`; sizes in the section, if given, must agree with its config.json."""
        encoder = load_t5gemma_encoder(section.path, mesh=mesh, rules=rules, dtype=_dtype(section, "dtype"),
                                       param_dtype=_dtype(section, "param_dtype"))
        _check_sizes(section, encoder.config)
        return encoder, TextTokenizer(section.path, section.max_length)

    def conditioner_encoder(self, entry_id: str, config: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any
                            ) -> tuple[int, None]:
        return _conditioner_dim(entry_id, config, "t5gemma_model_name", "google/t5gemma-b-b-ul2", T5GEMMA_DIMS), None

    def embedding_dim(self, section: ml_collections.ConfigDict) -> int:
        return T5GemmaEncoderConfig.from_mapping(_sizes(section, "hidden_size")).hidden_size

    def checkpoint_id(self, section: ml_collections.ConfigDict) -> str:
        return section.path


@register_text_encoder
class EmbeddedKind(TextEncoderKind):
    name = "embedded"
    batch_keys = {"input_ids": "prompt_input_ids", "attention_mask": "prompt_attention_mask"}

    def build(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs) -> T5Encoder:
        """The small trainable encoder over the caption tokenizer's vocabulary."""
        return _sized_encoder(section, rngs)

    def load(self, section: ml_collections.ConfigDict, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
             rules: Rules = DEFAULT_SHARDING_RULES) -> tuple[T5Encoder, TextTokenizer]:
        """A fresh trainable encoder and the caption tokenizer from `tokenizer_path`."""
        tokenizer = load_caption_tokenizer(section.tokenizer_path, section.max_length)
        if len(tokenizer) > section.vocab_size:
            raise ConfigError(f"config.text_encoder.vocab_size={section.vocab_size}: the tokenizer at "
                              f"{section.tokenizer_path} has {len(tokenizer)} tokens; use at least that")
        return self.build(section, rngs), tokenizer

    def conditioner_encoder(self, entry_id: str, config: Mapping[str, Any], rngs: nnx.Rngs, dtype: Any
                            ) -> tuple[int, T5Encoder]:
        encoder_config = T5EncoderConfig.from_mapping(config)
        if config.get("number_max"):
            return encoder_config.d_model, NumberAwareT5Encoder(
                encoder_config, number_max=float(config["number_max"]), digit_ids=config.get("digit_ids"),
                rngs=rngs, dtype=dtype)
        return encoder_config.d_model, T5Encoder(encoder_config, rngs=rngs, dtype=dtype)

    def prompt_encoder(self, section: ml_collections.ConfigDict, key: str) -> PromptEncoderFn:
        """Token ids only: the trainable encoder itself lives inside the conditioner's parameters."""
        prefix = key.rsplit(".", 1)[0]
        if not section.get("tokenizer_path"):
            raise ConfigError(f"{prefix}.tokenizer_path is empty: the run's tokenizer directory "
                              f"(written by launch.precompute_latents and copied into the training workdir)")
        tokenizer = load_caption_tokenizer(section.tokenizer_path, int(section.max_length))

        def encode(prompts: Sequence[str]) -> dict[str, np.ndarray]:
            tokens = tokenizer(list(prompts))
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

        return encode

    def prepare_outputs(self, section: ml_collections.ConfigDict, out: Path, captions: Sequence[str],
                        resuming: bool) -> None:
        """The caption tokenizer from every clip's caption, into OUT/tokenizer (built aside, then renamed); a resumed
        run keeps the one it built, so its token ids match the finished shards'. `tokenizer_from` (a tokenizer
        directory) copies that one instead: data for fine-tuning a model gets the token ids the model knows."""
        target = out / TOKENIZER_DIR
        if resuming and target.is_dir():
            return
        shutil.rmtree(target, ignore_errors=True)
        source = str(section.get("tokenizer_from", "") or "")
        if source and not (Path(source) / "tokenizer.json").is_file():
            raise ConfigError(f"config.text_encoder.tokenizer_from={source}: no tokenizer.json there; pass a run's "
                              f"tokenizer directory (WORKDIR/tokenizer of launch.train_diffusion)")
        with atomic_directory(target) as staging:
            if source:
                shutil.copytree(source, staging, dirs_exist_ok=True)
            else:
                build_caption_tokenizer(captions, staging, int(section.vocab_size),
                                        split_digits=bool(section.get("split_digits", False)))

    def caption_fields(self, section: ml_collections.ConfigDict, out: Path, *, mesh: Mesh, rules: Rules,
                       batch_size: int, dtype: Any) -> CaptionFieldsFn:
        tokenizer = load_caption_tokenizer(out / TOKENIZER_DIR, section.max_length)

        def fields(captions: list[str]) -> dict[str, dict[str, np.ndarray]]:
            tokens = tokenizer(captions)
            return {caption: {key: tokens[name][row] for name, key in self.batch_keys.items()}
                    for row, caption in enumerate(captions)}

        return fields

    def manifest_entry(self, section: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
        config = to_dict(section)
        config["tokenizer_path"] = TOKENIZER_DIR
        tokenizer_file = out / TOKENIZER_DIR / "tokenizer.json"
        return {"name": self.name, "id": f"caption-bpe-{sha256_file(tokenizer_file)[:16]}", "config": config,
                "max_length": int(section.max_length), "tokenizer_path": TOKENIZER_DIR,
                "vocab_size": len(load_caption_tokenizer(out / TOKENIZER_DIR, section.max_length))}

    def record_fields(self, record: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {self.batch_keys["input_ids"]: np.asarray(record[self.batch_keys["input_ids"]], np.int32),
                self.batch_keys["attention_mask"]: np.asarray(record[self.batch_keys["attention_mask"]], bool)}

    def resolve_training(self, prompt_section: ml_collections.ConfigDict, entry: Mapping[str, Any],
                         conditioner_config: Mapping[str, Any]) -> None:
        """The run uses the latents' caption tokenizer and token length; the conditioner's vocabulary must hold all
        its tokens, and a number-aware conditioner (`number_max` > 0) takes its digit token ids from it."""
        prompt_section.tokenizer_path = str(entry["tokenizer_path"])
        if conditioner_config.get("number_max"):
            tokenizer = load_caption_tokenizer(entry["tokenizer_path"], int(entry.get("max_length", 1)))
            conditioner_config["digit_ids"] = digit_token_ids(tokenizer, str(entry["tokenizer_path"]))
        prompt_section.max_length = int(entry.get("max_length", prompt_section.max_length))
        vocab = int(entry.get("vocab_size", conditioner_config["vocab_size"]))
        if vocab > int(conditioner_config["vocab_size"]):
            raise ConfigError(f"config.conditioner prompt vocab_size={conditioner_config['vocab_size']}: the "
                              f"latents' tokenizer has {vocab} tokens")

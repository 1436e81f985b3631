"""Adapter fine-tuning on a frozen diffusion model: the "lora" trainer (training/trainer.py), run by the shared runner.

    python -m launch.train_lora --config=configs/lora.py --config.init_from=BASE_RUN --config.data.audio=FOLDER \
        --workdir=RUN

The base run (`config.init_from`) decides the model: its `model`, `conditioner`, `prompt_encoder`, `objective`,
window length and autoencoder are copied into this run's config, so the adapter fits the weights it is trained on.
State (a DiffusionTrainer state whose params gain a section):
    params/{model, conditioner}   the base, frozen (no gradient, no optimiser state), held in `lora.base_dtype`
    params/adapter/{model, conditioner}/<layer>/<tensor>   the adapter (musicdiff/models/weight_adapters.py), fp32
    ema/adapter                   EMA of the adapter alone (the base needs none)
The loss is the diffusion trainer's, on the base with the adapter applied in weight space at strength 1. The run
writes WORKDIR/adapter.safetensors (from the EMA) when it ends; `launch.generate --config.adapters=FILE[:STRENGTH]`
loads it onto the base.

Data: `config.data.latents` (launch.precompute_latents output made with the base's autoencoder and tokenizer), or
`config.data.audio`, an audio folder that the run encodes first into WORKDIR/latents with the base's autoencoder and
the base's caption tokenizer (resumable, as launch.precompute_latents is), optionally restricted by caption words.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicdiff.checkpoints import CheckpointRef, find_checkpoint
from musicdiff.config import to_dict
from musicdiff.errors import ConfigError
from musicdiff.models import registry
from musicdiff.models.denoiser import Denoiser
from musicdiff.models.conditioning import MultiConditioner
from musicdiff.models.weight_adapters import (TENSORS, TRAINED, AdapterConfig, StackEntry, apply_adapters, find_targets,
                                              init_adapter, parameter_count, save_adapter)
from musicdiff.parallel.distributed import on_main_process
from musicdiff.training.diffusion import SECTIONS, DiffusionTrainer
from musicdiff.training.trainer import register_trainer

log = logging.getLogger(__name__)
ADAPTER = "adapter"
ADAPTER_FILE = "adapter.safetensors"
BASE_SECTIONS = ("model", "conditioner", "prompt_encoder", "objective")  # what the base run decides


def with_base(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the base run's model sections, window length and autoencoder (see the module docstring). A config
    without `init_from` that already holds the model sections is used as it is (benchmarks of a model shape)."""
    if not config.get("init_from", "") and all(section in config for section in BASE_SECTIONS):
        return config
    if not config.get("init_from", ""):
        raise ConfigError("config.init_from is empty: pass the diffusion run (workdir or checkpoint) the adapter "
                          "fine-tunes, e.g. --config.init_from=demo_out/diffusion")
    base = find_checkpoint(str(config.init_from)).config
    missing = [section for section in BASE_SECTIONS if section not in base]
    if missing:
        raise ConfigError(f"config.init_from={config.init_from}: its config has no '{missing[0]}' section; it is not a "
                          f"diffusion run")
    config = ml_collections.ConfigDict(to_dict(config))
    for section in BASE_SECTIONS:
        config[section] = ml_collections.ConfigDict(to_dict(base[section]))
    config.data.latent_length = int(base.data.latent_length)
    config.data.cond_tokens = int(base.data.get("cond_tokens", 0))
    if not config.get("autoencoder_checkpoint", ""):
        config.autoencoder_checkpoint = str(base.get("autoencoder_checkpoint", ""))
    return config


@register_trainer("lora")
class LoraTrainer(DiffusionTrainer):
    """A weight adapter on a frozen diffusion model (see the module docstring)."""

    optional_sections = (ADAPTER,)
    ema_sections = (ADAPTER,)  # the frozen base needs no EMA

    def __init__(self, config: ml_collections.ConfigDict):
        config = with_base(config)
        self.adapter_config = AdapterConfig.from_mapping(
            {k: v for k, v in to_dict(config.lora).items() if k != "base_dtype"})
        # The adapter's trained tensors (not LoRA-XS's bases); everything else is frozen.
        self.trainable_patterns = tuple(f"{ADAPTER}/*/{tensor}" for tensor in TENSORS[self.adapter_config.kind]
                                        if tensor in TRAINED)
        super().__init__(config)
        self.targets = self._targets(config)

    def _targets(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        modules = {name: nnx.eval_shape(lambda n=name: registry.build(config[n], nnx.Rngs(0))) for name in SECTIONS}
        return find_targets(modules, self.adapter_config)

    def prepare(self, workdir: Path) -> ml_collections.ConfigDict:
        if not self.config.data.get("latents", "") and self.config.data.get("audio", ""):
            self.config.data.latents = str(_encode_audio(self.config, workdir))
        config = super().prepare(workdir)
        self.targets = self._targets(config)
        return config

    # ---- state

    def _base_dtype(self) -> Any:
        name = str(self.config.lora.get("base_dtype", "float32"))
        if name not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"config.lora.base_dtype={name!r}: expected float32, bfloat16 or float16")
        return jnp.dtype(name)

    def init_params(self, key: jax.Array) -> dict[str, Any]:
        base_key, adapter_key = jax.random.split(key)
        params = super().init_params(base_key)
        dtype = self._base_dtype()
        params = {name: jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                     section) for name, section in params.items()}
        params[ADAPTER] = init_adapter(adapter_key, self.adapter_config, self.targets, params)
        return params

    def load_weights(self, state: Any, shardings: Any, ref: CheckpointRef) -> Any:
        """The base from `ref`; the adapter is then initialised on it (DoRA magnitudes and LoRA-XS bases are
        functions of the base weights)."""
        state = super().load_weights(state, shardings, ref)
        params = dict(state["params"])
        fresh = jax.jit(lambda p: init_adapter(jax.random.key(int(self.config.seed) + 1), self.adapter_config,
                                               self.targets, p),
                        out_shardings=shardings["params"][ADAPTER])
        params[ADAPTER] = fresh({name: params[name] for name in SECTIONS})
        return {**state, "params": params, "ema": {ADAPTER: jax.tree.map(jnp.copy, params[ADAPTER])}}

    def stack(self) -> list[StackEntry]:
        return [StackEntry(self.adapter_config, self.targets)]

    def adapted(self, params: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
        """{model, conditioner} states with `adapter` applied at strength 1."""
        return apply_adapters({name: params[name] for name in SECTIONS}, self.stack(), [adapter])

    def models(self, params: Mapping[str, Any]) -> tuple[Denoiser, MultiConditioner]:
        return super().models(self.adapted(params, params[ADAPTER]))

    # ---- hooks

    def demo(self, workdir, logger, mesh, rules):
        preview = super().demo(workdir, logger, mesh, rules)
        if preview is None:
            return None
        return lambda step, state: preview(step, {"ema": self.adapted(state["params"], state["ema"][ADAPTER])})

    def finish(self, state: Any, result: Any, workdir: Path) -> Any:
        adapter = jax.device_get(state["ema"][ADAPTER])
        trained, stored = parameter_count(adapter)
        path = Path(workdir) / ADAPTER_FILE

        def write() -> None:
            save_adapter(path, self.adapter_config, adapter, extra_metadata={
                "base": str(Path(str(self.config.init_from)).resolve()), "step": str(int(state["step"])),
                "trained_parameters": str(trained)})
            log.info("wrote %s: %d trained / %d stored values, %d bytes", path, trained, stored, path.stat().st_size)

        on_main_process("musicdiff_lora_adapter_file", write)
        return result


def _encode_audio(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Precomputes `config.data.audio` into WORKDIR/latents with the settings that made the base's latents (its
    autoencoder, window, text encoder), the base's caption tokenizer, and this run's caption filters."""
    from musicdiff.inference.precompute import precompute_latents

    base = find_checkpoint(str(config.init_from)).config
    latents = str(base.data.get("latents", ""))
    if not latents or not Path(latents).is_dir():
        raise ConfigError(f"config.data.audio: encoding it repeats the settings of the base run's latents, and the "
                          f"base's config names {latents!r}, which is not there; precompute the audio with "
                          f"launch.precompute_latents and pass --config.data.latents=DIR")
    from data_pipelines.latent_source import read_manifest

    precompute = ml_collections.ConfigDict(read_manifest(latents)["config"])
    precompute.autoencoder_checkpoint = str(config.autoencoder_checkpoint)
    precompute.root = ""
    precompute.data.root = str(config.data.audio)
    precompute.data.caption_include = list(config.data.get("caption_include", ()))
    precompute.data.caption_exclude = list(config.data.get("caption_exclude", ()))
    for section in ("distributed", "mesh", "sharding_rules"):  # this run's devices, not the base's
        precompute[section] = config[section]
    if precompute.text_encoder.get("name") == "embedded":  # the base's token ids, not a tokenizer of these captions
        precompute.text_encoder.tokenizer_from = str(config.prompt_encoder.tokenizer_path)
    out = Path(workdir) / "latents"
    precompute_latents(precompute, out)
    return out


__all__ = ["ADAPTER", "ADAPTER_FILE", "LoraTrainer", "with_base"]

"""Stable Audio 3 state dicts <-> musicdiff parameters for the DiT and its conditioner (spec §9.2), both ways.

    params = dit_params_from_state_dict(state, config.model)            # keys "model.model.*"
    state = state_dict_from_dit_params(params, config.model)            # the same keys, torch layout, float32
    cond = conditioner_params_from_state_dict(state, config.conditioner)  # "conditioner.conditioners.*"
    state |= state_dict_from_conditioner_params(cond, config.conditioner)

`state` is a flat {key: array} mapping (numpy, torch tensors converted by the caller, or a safetensors file's
tensors) that may hold other groups too (the SAME autoencoder under `pretransform.model.`): only the keys under
`prefix` are read, and every one of them must be a tensor of the model. The tensor map is the SAO converter's
(stable_audio_keys.py: dit_rules, conditioner_rules), which covers the SA3 options:

    transformer.memory_tokens [M, E]                    transformer.memory_tokens (M, E)
    transformer.global_cond_embedder.{in,out}_proj      transformer.global_cond_embedder.{0,2} (E -> E -> 6E, bias)
    transformer.layers.N.to_scale_shift_gate [6, E]     transformer.layers.N.to_scale_shift_gate (6E)
    transformer.layers.N.{pre_norm,cross_attend_norm,ff_norm}.scale, {self_attn,cross_attn}.{q,k}_norm.scale
                                                        ... .gamma (RMSNorm)
    transformer.layers.N.self_attn.to_qkv [E, 5, H, d]  ... self_attn.to_qkv.weight (5E, E), chunks q, k, v, q2, k2
    transformer.layers.N.cross_attn.to_q [E, 2, H, d]; to_kv [E, 3, H, d]   ... (2E, E); (3E, E) k, k2, v
    conditioners.seconds_total.{kernel [256, 768], bias}   seconds_total.embedder.embedding.1.{weight, bias}
    conditioners.prompt.padding_embedding [768]             prompt.padding_embedding
The ExpoFourier features (timestep and seconds) have no tensor; `transformer.rotary_pos_emb.inv_freq` is a buffer,
checked against its fixed value on import and written on export. Every tensor passes
`musicdiff.weight_files.checked_cast` (NaN/inf refused by key). The T5Gemma encoder is not in SA3 checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from musicdiff.convert.stable_audio import ArraySource, SectionPlan, convert_section, export_section, plan_section
from musicdiff.convert.stable_audio_keys import CONDITIONER_PREFIX, DIT_PREFIX
from musicdiff.errors import DataError
from musicdiff.models.dit import DiTConfig


def _section(config: Any, name: str) -> ml_collections.ConfigDict:
    """A registry section from a config section (ConfigDict or dict) or a DiTConfig."""
    if isinstance(config, DiTConfig):
        values = dataclasses.asdict(config)
        values["adapter"] = dict(config.adapter)
        return ml_collections.ConfigDict(dict(values, name="dit"))
    section = ml_collections.ConfigDict(dict(config))
    if "name" not in section:
        section.name = name
    return section


DEFAULT_NAMES = {"model": "dit", "conditioner": "multi_conditioner", "autoencoder": "same"}


def plan(section: str, config: Any, prefix: str) -> SectionPlan:
    """The tensor rules of the "model" (DiT), "conditioner" or "autoencoder" (SAME) section, from shapes only."""
    return plan_section(section, _section(config, DEFAULT_NAMES[section]), prefix)


def check_state_dict(state: Mapping[str, Any], section_plan: SectionPlan, prefix: str,
                     name: str = "state dict") -> None:
    """Refuses the first key of the plan that `state` lacks or holds with another shape, then the first key under
    `prefix` that the model has no tensor for."""
    for rule in section_plan.rules:
        if rule.key not in state:
            raise DataError(f"{name}: missing key {rule.key} (shape {rule.reference_shape}) for "
                            f"config.{section_plan.section}")
        shape = tuple(np.shape(state[rule.key]))
        if shape != rule.reference_shape:
            raise DataError(f"{name}: {rule.key} has shape {shape}; config.{section_plan.section} expects "
                            f"{rule.reference_shape}")
    known = {rule.key for rule in section_plan.rules}
    unknown = sorted(key for key in state if key.startswith(prefix) and key not in known)
    if unknown:
        raise DataError(f"{name}: {unknown[0]} is no tensor of config.{section_plan.section} "
                        f"({len(unknown)} such key(s) under {prefix!r})")


def params_from_state_dict(section: str, state: Mapping[str, Any], config: Any, prefix: str,
                           name: str = "state dict") -> nnx.State:
    section_plan = plan(section, config, prefix)
    check_state_dict(state, section_plan, prefix, name)
    return convert_section(ArraySource(state, name), section_plan)


def state_dict_from_params(section: str, params: nnx.State | Mapping[str, Any], config: Any,
                           prefix: str) -> dict[str, np.ndarray]:
    """The reference tensors (torch layout, float32, buffers included) of a section's parameters (an nnx.State of
    its Params, or the same tree as a nested dict)."""
    section_plan = plan(section, config, prefix)
    if not isinstance(params, nnx.State):
        state = nnx.State(section_plan.abstract.to_pure_dict())
        nnx.replace_by_pure_dict(state, params)
        params = state
    return export_section(params, section_plan)


def dit_params_from_state_dict(state: Mapping[str, Any], config: Any, prefix: str = DIT_PREFIX,
                               name: str = "state dict") -> nnx.State:
    """The DiT's parameters (nnx.State, as nnx.state(model, nnx.Param)) from the tensors under `prefix`."""
    return params_from_state_dict("model", state, config, prefix, name)


def state_dict_from_dit_params(params: nnx.State, config: Any, prefix: str = DIT_PREFIX) -> dict[str, np.ndarray]:
    """The reference tensors (torch layout, float32, buffers included) of the DiT's parameters."""
    return state_dict_from_params("model", params, config, prefix)


def conditioner_params_from_state_dict(state: Mapping[str, Any], config: Any, prefix: str = CONDITIONER_PREFIX,
                                       name: str = "state dict") -> nnx.State:
    """The conditioner's parameters (the seconds embedder's Linear, the prompt's padding embedding) from the tensors
    under `prefix`."""
    return params_from_state_dict("conditioner", state, config, prefix, name)


def state_dict_from_conditioner_params(params: nnx.State, config: Any,
                                       prefix: str = CONDITIONER_PREFIX) -> dict[str, np.ndarray]:
    return state_dict_from_params("conditioner", params, config, prefix)


__all__ = ["check_state_dict", "conditioner_params_from_state_dict", "dit_params_from_state_dict", "plan",
           "params_from_state_dict", "state_dict_from_conditioner_params", "state_dict_from_dit_params",
           "state_dict_from_params"]

"""The Stable Audio converter's key map, shape checks and config translation at full SAO size (no torch needed).

- Every key and shape of the released SAO 1.0 state dict (fixtures/sao_1_0_state_dict_shapes.json, 745 tensors)
  goes through the converter with random values, generated lazily one tensor at a time (1.2 B parameters would be
  ~5 GB at once): key matching, per-tensor layout transform and shape check against the musicdiff model, and the
  inverse transform back to the reference layout, bit for bit (for every tensor but DiT blocks 1-23, which repeat
  block 0's layouts).
- SAO 1.0's model_config.json converts to exactly the configs/diffusion.py:sao and configs/autoencoder.py:sao
  architectures (so `--config=configs/diffusion.py:sao --config.init_from=OUT/diffusion` fine-tunes it), with the
  closed-form parameter counts of spec §1.8 / §2.7.
- Options musicdiff cannot reproduce are refused with their names.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config, validate
from musicdiff.convert.stable_audio import TensorSource, check_keys, iter_converted, plan_section
from musicdiff.convert.stable_audio_config import import_configs, reference_model_config
from musicdiff.convert.stable_audio_keys import PRETRANSFORM_PREFIX
from musicdiff.errors import ConfigError, DataError

FIXTURE = Path(__file__).parent / "fixtures" / "stable_audio_open_1_0_model_config.json"
# A copy of shared/spec/sao_1_0_state_dict_shapes.json (every tensor name and shape of the released SAO 1.0 file).
SPEC_SHAPES = Path(__file__).parent / "fixtures" / "sao_1_0_state_dict_shapes.json"
# Spec §1.8 / §2.7 (derived from the shape enumerator; they match the paper's 156 M / 1057 M / 1.21 B).
SAO_AUTOENCODER_PARAMS = 156_112_514
SAO_DIT_PARAMS = 1_056_828_544
SAO_NUMBER_CONDITIONER_PARAMS = 2 * 198_272
SAO_SMALL_DIT_PARAMS = 340_863_104


def sao_config() -> dict:
    return json.loads(FIXTURE.read_text())


def sao_small_config() -> dict:
    """SAO Small as spec §8.2 describes it (prompt with 64 tokens, seconds_total 0..256, rf_denoiser)."""
    config = sao_config()
    config["sample_size"] = 524288
    model = config["model"]
    model["conditioning"]["configs"] = [
        dict(id="prompt", type="t5", config=dict(t5_model_name="t5-base", max_length=64)),
        dict(id="seconds_total", type="number", config=dict(min_val=0, max_val=256))]
    model["diffusion"] = dict(
        cross_attention_cond_ids=["prompt", "seconds_total"], global_cond_ids=["seconds_total"],
        diffusion_objective="rf_denoiser", type="dit",
        config=dict(io_channels=64, embed_dim=1024, depth=16, num_heads=8, cond_token_dim=768, global_cond_dim=768,
                    transformer_type="continuous_transformer"))
    return config


def param_count(state: nnx.State) -> int:
    return sum(math.prod(var.get_value().shape) for _, var in nnx.to_flat_state(state))


class RandomSource(TensorSource):
    """A state dict of the given shapes whose parameters are drawn (seeded by the key) only when read; buffers
    hold the reference's values."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], overrides: dict[str, np.ndarray] | None = None):
        self.shapes, self.overrides, self.name = shapes, overrides or {}, "random SAO 1.0 state dict"
        self._last: tuple[str, np.ndarray] | None = None  # the test reads each tensor twice in a row

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.shapes[key])

    def read(self, key: str) -> np.ndarray:
        if key in self.overrides:
            return self.overrides[key]
        if key.endswith("norm.beta"):  # the reference's bias-free LayerNorm: a zero buffer
            return np.zeros(self.shapes[key], np.float32)
        if key.endswith("rotary_pos_emb.inv_freq"):  # 10000^(-2j/32), j < 16 (spec §2.2)
            return (1.0 / 10000 ** (np.arange(0, 32, 2, dtype=np.float32) / 32)).astype(np.float32)
        if self._last is None or self._last[0] != key:
            self._last = key, np.random.default_rng(zlib.crc32(key.encode())).random(self.shapes[key], np.float32)
        return self._last[1]


def plans_for(reference: dict):
    ae, diffusion = import_configs(reference, autoencoder_checkpoint="/converted/autoencoder")
    return [plan_section("autoencoder", ae.autoencoder, PRETRANSFORM_PREFIX), plan_section("model", diffusion.model),
            plan_section("conditioner", diffusion.conditioner)]


@pytest.fixture(scope="module")
def sao_plans():
    return plans_for(sao_config())


def test_every_sao_1_0_key_and_shape_converts_with_no_key_left_over(sao_plans):
    shapes = {key: tuple(shape) for key, shape in json.loads(SPEC_SHAPES.read_text()).items()}
    assert len(shapes) == 745
    source = RandomSource(shapes)
    check_keys(source, sao_plans)
    seen, parameters, buffers = set(), {}, 0
    for plan in sao_plans:
        targets = plan.targets()
        for rule, array in iter_converted(source, plan):
            seen.add(rule.key)
            assert array.shape == targets[rule.path].get_value().shape
            block = rule.key.startswith("model.model.transformer.layers.")
            if not block or rule.key.startswith("model.model.transformer.layers.0."):  # blocks 1-23 repeat 0
                assert np.array_equal(rule.to_reference(array), source.get(rule.key)), rule.key  # exact inverse
            parameters[plan.section] = parameters.get(plan.section, 0) + array.size
        buffers += sum(rule.path is None for rule in plan.rules)
    # LayerNorm betas (3 per block) and rotary inv_freq are checked buffers; every other key became a parameter.
    assert buffers == 3 * 24 + 1
    assert seen | {r.key for p in sao_plans for r in p.rules if r.path is None} == set(shapes)
    print(f"converted {len(seen)} parameters + {buffers} buffers: {parameters}")
    assert parameters == {"autoencoder": SAO_AUTOENCODER_PARAMS, "model": SAO_DIT_PARAMS,
                          "conditioner": SAO_NUMBER_CONDITIONER_PARAMS}


def test_non_default_buffers_are_refused(sao_plans):
    shapes = {key: tuple(shape) for key, shape in json.loads(SPEC_SHAPES.read_text()).items()}
    beta = "model.model.transformer.layers.3.ff_norm.beta"
    source = RandomSource(shapes, {beta: np.full(shapes[beta], 0.5, np.float32)})
    with pytest.raises(DataError, match=f"buffer {beta} differs"):
        for _ in iter_converted(source, sao_plans[1]):
            pass


def test_sao_1_0_config_is_the_sao_presets(sao_plans):
    ae, diffusion = import_configs(sao_config(), autoencoder_checkpoint="/converted/autoencoder",
                                   t5_path="/models/t5-base")
    preset = load_config("configs/diffusion.py:sao")
    # Deliberate differences: reference parity (the reference DiT ignores the mask) and inference-ready settings.
    expected = dict(preset.model.to_dict(), use_cross_attn_mask=False, dtype="float32", remat="none")
    assert diffusion.model.to_dict() == expected
    assert diffusion.conditioner.to_dict() == preset.conditioner.to_dict()
    assert diffusion.prompt_encoder.to_dict() == dict(preset.prompt_encoder.to_dict(), path="/models/t5-base")
    assert diffusion.objective.to_dict() == preset.objective.to_dict()
    assert diffusion.training.to_dict() == preset.training.to_dict()  # the reference recipe is the preset's
    assert (diffusion.data.latent_length, diffusion.data.cond_tokens) == (1024, 130)
    assert diffusion.autoencoder_checkpoint == "/converted/autoencoder"
    assert ae.autoencoder.to_dict() == load_config("configs/autoencoder.py:sao").autoencoder.to_dict()
    for config in (ae, diffusion):
        validate(config, None)
    assert [param_count(p.abstract) for p in sao_plans] == [SAO_AUTOENCODER_PARAMS, SAO_DIT_PARAMS,
                                                            SAO_NUMBER_CONDITIONER_PARAMS]


@pytest.mark.parametrize("qk_norm", ["none", "ln"])
def test_sao_small_config(qk_norm):
    reference = sao_small_config()
    if qk_norm == "ln":
        reference["model"]["diffusion"]["config"]["attn_kwargs"] = dict(qk_norm="ln")
    _, diffusion = import_configs(reference, autoencoder_checkpoint="/converted/autoencoder")
    assert diffusion.objective.name == "rf_denoiser"
    assert (diffusion.data.latent_length, diffusion.data.cond_tokens) == (256, 65)
    assert diffusion.model.project_cond_tokens and diffusion.model.qk_norm == qk_norm
    plan = plan_section("model", diffusion.model)
    # q_norm / k_norm (weight + bias over head dim 128) in self- and cross-attention of 16 blocks.
    assert param_count(plan.abstract) == SAO_SMALL_DIT_PARAMS + (16 * 2 * 2 * 2 * 128 if qk_norm == "ln" else 0)
    if qk_norm == "ln":
        keys = {rule.key for rule in plan.rules}
        assert {"model.model.transformer.layers.0.self_attn.q_norm.weight",
                "model.model.transformer.layers.15.cross_attn.k_norm.bias"} <= keys


def _modified(path: str, value) -> dict:
    config = sao_config()
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[leaf] = value
    return config


@pytest.mark.parametrize("path, value, message", [
    ("model.diffusion.config.global_cond_type", "adaLN", "global_cond_type='adaLN'"),
    ("model.diffusion.config.patch_size", 2, "patch_size=2"),
    ("model.diffusion.config.attn_kwargs.qk_norm", "l2", "qk_norm='l2'"),
    ("model.diffusion.config.num_memory_tokens", 4, "num_memory_tokens=4"),
    ("model.diffusion.distribution_shift_options", {"min_length": 256}, "distribution_shift_options"),
    ("model.pretransform.scale", 0.5, "pretransform.scale=0.5"),
    ("model.pretransform.config.encoder.config.antialias_activation", True, "antialias_activation=True"),
    ("model.pretransform.config.bottleneck.type", "rvq", "bottleneck.type='rvq'"),
    ("model.conditioning.configs.0.type", "clap_text", "type 'clap_text'"),
    ("model.conditioning.configs.0.config.enable_grad", True, "enable_grad"),
    ("model_type", "lm", "model_type='lm'"),
])
def test_unsupported_options_are_refused_by_name(path, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plans_for(_modified(path, value))


def test_nearest_upsampling_decoder_is_refused_by_export():
    # Its keys would map one to one, but the reference config would describe a transposed-conv decoder.
    section = load_config("configs/autoencoder.py:demo").autoencoder.to_dict()
    assert section["decoder_upsample"] == "nearest"  # the demo's own decoder: not exportable
    assert reference_model_config(None, {**section, "decoder_upsample": "transpose"})["model"]["decoder"]["type"] \
        == "oobleck"
    with pytest.raises(ConfigError, match="decoder_upsample='nearest'"):
        reference_model_config(None, {**section, "decoder_upsample": "nearest"})


def test_autoencoder_only_model_config():
    vae = dict(model_type="autoencoder", sample_rate=44100, sample_size=65536, audio_channels=2,
               model=copy.deepcopy(sao_config()["model"]["pretransform"]["config"]))
    ae, diffusion = import_configs(vae, autoencoder_checkpoint="unused")
    assert diffusion is None and ae.data.sample_size == 65536
    plan = plan_section("autoencoder", ae.autoencoder, "")
    assert {rule.key for rule in plan.rules} == {key[len(PRETRANSFORM_PREFIX):]
                                                 for key in json.loads(SPEC_SHAPES.read_text())
                                                 if key.startswith(PRETRANSFORM_PREFIX)}

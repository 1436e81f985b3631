"""Half-precision and non-finite weight files: the Stable Audio converter and adapter files (musicdiff.weight_files).

The checkpoint is the reduced SAO 1.0 layout of tests/sao_fixtures.py with random weights (our initialisation plus
0.02 N(0, 1) everywhere, so no path is zero), exported in stable-audio-tools' layout as float32, then saved again as
float16 and bfloat16 copies (buffers included, as a `.half()` export does), as safetensors and as `.ckpt`.

- Every converted parameter is float32 and equals the stored half-precision value exactly (the cast is exact).
- The converted models' outputs (conditioner + DiT, VAE encoder mean, decoder) on a fixed input match those of the
  float32 checkpoint within OUTPUT_FACTOR = 4 x eps(dtype) x max |float32 output| (eps 9.8e-4 for float16, 7.8e-3
  for bfloat16): each weight is rounded with relative error <= eps / 2, the errors of a few layers add up mostly
  incoherently (measured: 0.40 / 0.96 / 0.80 eps in float16, 0.45 / 0.59 / 0.74 eps in bfloat16), and float32
  arithmetic adds ~1e-6. 4 eps leaves a 4x margin yet catches any misplaced or dropped tensor (an O(1) change).
- A NaN or inf weight is refused with the file and the tensor's name; a fixed buffer is accepted within one
  rounding step of its stored dtype and refused beyond it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.convert.stable_audio import (ArraySource, check_buffer, check_keys, convert_section, export_section,
                                            import_stable_audio, open_checkpoint, plan_section)
from musicdiff.convert.stable_audio_config import import_configs
from musicdiff.convert.stable_audio_keys import PRETRANSFORM_PREFIX
from musicdiff.errors import DataError
from musicdiff.models import registry
from musicdiff.parallel.sharding import unsharded
from musicdiff.models.weight_adapters import AdapterConfig, read_adapter, save_adapter
from musicdiff.weight_files import checked_cast, rounding_step
from tests.sao_fixtures import FRAMES, MAX_LENGTH, reduced_sao_config

pytestmark = pytest.mark.usefixtures("unsharded")

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
OUTPUT_FACTOR = 4  # x eps(dtype) x max |float32 output|; measured 0.4-1.0 eps (see the docstring)
INV_FREQ = "model.model.transformer.rotary_pos_emb.inv_freq"
BETA = "model.model.transformer.layers.1.ff_norm.beta"
WEIGHT = "model.model.transformer.layers.1.self_attn.to_qkv.weight"


@pytest.fixture(scope="module")
def sao(tmp_path_factory):
    """(directory with model_config.json, plans, float32 reference tensors {key: array})."""
    import json

    reference = reduced_sao_config()
    ae, diffusion = import_configs(reference, autoencoder_checkpoint="unused")
    sections = (("autoencoder", ae.autoencoder, PRETRANSFORM_PREFIX), ("model", diffusion.model, None),
                ("conditioner", diffusion.conditioner, None))
    rng = np.random.default_rng(0)
    plans, tensors = [], {}
    for section, config, prefix in sections:
        plan = plan_section(section, config, prefix)
        params = nnx.state(registry.build(config, nnx.Rngs(0)), nnx.Param)
        params = jax.tree.map(lambda leaf: leaf + 0.02 * rng.standard_normal(leaf.shape).astype(np.float32), params)
        plans.append(plan)
        tensors.update(export_section(params, plan))
    directory = tmp_path_factory.mktemp("sao_precision")
    (directory / "model_config.json").write_text(json.dumps(reference))
    return directory, plans, tensors


def save(tensors: dict[str, np.ndarray], dtype, path: Path) -> Path:
    """`tensors` rounded to `dtype`, as safetensors or as a torch `.ckpt` state dict."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({key: np.ascontiguousarray(value.astype(dtype)) for key, value in tensors.items()}, str(path))
    else:
        torch = pytest.importorskip("torch")
        torch_dtype = {np.float16: torch.float16, ml_dtypes.bfloat16: torch.bfloat16, np.float32: torch.float32}
        torch.save({"state_dict": {key: torch.from_numpy(value.copy()).to(torch_dtype[dtype]) for key, value
                                   in tensors.items()}}, str(path))
    return path


def rounded(tensors: dict[str, np.ndarray], dtype, plans) -> dict[str, np.ndarray]:
    """float32 tensors holding the values of `dtype`; the buffers keep their exact float32 values."""
    buffers = {rule.key for plan in plans for rule in plan.rules if rule.path is None}
    return {key: value if key in buffers else value.astype(dtype).astype(np.float32) for key, value in tensors.items()}


def convert(source, plans) -> dict[str, nnx.State]:
    check_keys(source, plans)
    return {plan.section: convert_section(source, plan) for plan in plans}


def assert_params_equal(params: dict[str, nnx.State], expected: dict[str, nnx.State]) -> None:
    for section, state in params.items():
        wanted = dict(nnx.to_flat_state(expected[section]))
        for path, var in nnx.to_flat_state(state):
            value = var.get_value()
            assert value.dtype == jnp.float32, (section, path, value.dtype)
            np.testing.assert_array_equal(np.asarray(value), np.asarray(wanted[path].get_value()),
                                          err_msg=f"{section} {path}")


def outputs(plans, params: dict[str, nnx.State]) -> dict[str, np.ndarray]:
    """Conditioner + DiT, VAE encoder mean and decoder outputs on fixed inputs."""
    modules = {plan.section: nnx.merge(plan.graphdef, params[plan.section]) for plan in plans}
    rng = np.random.default_rng(1)
    dit, conditioner, ae = modules["model"], modules["conditioner"], modules["autoencoder"]
    inputs = {"prompt": {"embeddings": jnp.asarray(rng.standard_normal((2, MAX_LENGTH, 768)), jnp.float32),
                         "mask": jnp.asarray([[True] * MAX_LENGTH, [True] * 3 + [False] * (MAX_LENGTH - 3)])},
              "seconds_start": jnp.asarray([3.0, 100.0]), "seconds_total": jnp.asarray([30.0, 470.0])}
    x = jnp.asarray(rng.standard_normal((2, dit.config.io_channels, 16)), jnp.float32)
    audio = jnp.asarray(0.5 * rng.standard_normal((2, 2, 2048 * FRAMES)), jnp.float32)
    latents = jnp.asarray(rng.standard_normal((2, ae.config.latent_dim, FRAMES)), jnp.float32)
    with unsharded(), jax.default_matmul_precision("highest"):
        return {"DiT": np.asarray(dit(x, jnp.asarray([0.3, 0.8]), conditioner.condition(inputs))),
                "VAE mean": np.asarray(ae.encode(audio, sample=False)[0]),
                "decoder": np.asarray(ae.decode(latents))}


@pytest.fixture(scope="module")
def float32_outputs(sao):
    directory, plans, tensors = sao
    return outputs(plans, convert(open_checkpoint(save(tensors, np.float32, directory / "fp32.safetensors")), plans))


def test_float16_checkpoint_imports_with_the_stored_values(sao, tmp_path):
    """The issue's case: an fp16 copy of a valid checkpoint (inv_freq then differs from float32 by 1.6e-4)."""
    directory, plans, tensors = sao
    assert np.max(np.abs(tensors[INV_FREQ].astype(np.float16) - tensors[INV_FREQ])) > 1e-4
    path = save(tensors, np.float16, tmp_path / "model.safetensors")
    imported = import_stable_audio(directory / "model_config.json", path, tmp_path / "out")
    loaded = {}
    for checkpoint, sections in ((imported.autoencoder, ("autoencoder",)),
                                 (imported.diffusion, ("model", "conditioner"))):
        ref = find_checkpoint(checkpoint)
        loaded.update({name: nnx.state(load_model(ref, name), nnx.Param) for name in sections})
    assert_params_equal(loaded, convert(ArraySource(rounded(tensors, np.float16, plans)), plans))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_half_precision_parameters_are_the_stored_values_in_float32(sao, tmp_path, dtype, suffix):
    _, plans, tensors = sao
    source = open_checkpoint(save(tensors, DTYPES[dtype], tmp_path / f"model{suffix}"))
    assert source.read(WEIGHT).dtype == DTYPES[dtype]
    expected = rounded(tensors, DTYPES[dtype], plans)
    assert not np.array_equal(expected[WEIGHT], tensors[WEIGHT])  # rounding did change the weights
    assert_params_equal(convert(source, plans), convert(ArraySource(expected), plans))


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_outputs_match_float32_within_rounding(measurement, sao, float32_outputs, tmp_path, dtype):
    _, plans, tensors = sao
    half = outputs(plans, convert(open_checkpoint(save(tensors, DTYPES[dtype], tmp_path / "m.safetensors")), plans))
    eps = rounding_step(DTYPES[dtype])
    for name, expected in float32_outputs.items():
        scale = float(np.max(np.abs(expected)))
        ratio = float(np.max(np.abs(half[name] - expected))) / scale
        print(f"{dtype} {name}: max|half - float32| / max|float32| = {ratio:.3e} ({ratio / eps:.3f} eps), "
              f"tolerance {OUTPUT_FACTOR} eps = {OUTPUT_FACTOR * eps:.3e}")
        measurement(f"{dtype} {name}: max|diff| / max|float32 output| (tol {OUTPUT_FACTOR} x eps {eps:.3g})", ratio)
        assert scale > 0 and 0 < ratio <= OUTPUT_FACTOR * eps, (name, ratio)


@pytest.mark.parametrize("value, dtype, suffix", [(np.nan, np.float16, ".safetensors"),
                                                  (np.inf, np.float32, ".safetensors"),
                                                  (-np.inf, ml_dtypes.bfloat16, ".ckpt")])
def test_non_finite_weight_is_refused_with_its_name(sao, tmp_path, value, dtype, suffix):
    directory, _, tensors = sao
    damaged = dict(tensors)
    damaged[WEIGHT] = tensors[WEIGHT].copy()
    damaged[WEIGHT][3, 5] = value
    path = save(damaged, dtype, tmp_path / f"model{suffix}")
    with pytest.raises(DataError) as error:
        import_stable_audio(directory / "model_config.json", path, tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"{path}: tensor {WEIGHT} ") and "non-finite" in message
    assert f"1 {'NaN' if np.isnan(value) else 'inf'} of {tensors[WEIGHT].size}" in message
    assert not (tmp_path / "out").exists()


def test_buffers_are_compared_at_their_stored_precision(sao):
    _, plans, tensors = sao
    rules = {rule.key: rule for rule in plans[1].rules}
    source = ArraySource({}, name="model.safetensors")
    inv_freq = tensors[INV_FREQ]
    assert inv_freq[0] == 1.0
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        check_buffer(source, rules[INV_FREQ], inv_freq.astype(dtype))
    # One float16 step above 1.0 (an export that rounded the other way) is accepted; two steps are not.
    for steps, accepted in ((1, True), (2, False)):
        moved = inv_freq.astype(np.float16)
        moved[0] = np.float16(1.0) + steps * np.float16(rounding_step(np.float16))
        if accepted:
            check_buffer(source, rules[INV_FREQ], moved)
        else:
            with pytest.raises(DataError, match=f"buffer {INV_FREQ} differs from its fixed value beyond the "
                                                f"precision of its dtype float16"):
                check_buffer(source, rules[INV_FREQ], moved)
    # float32 keeps its tolerance: the fp16 rounding error stored as float32 is refused.
    with pytest.raises(DataError, match=f"buffer {INV_FREQ} differs .* dtype float32"):
        check_buffer(source, rules[INV_FREQ], inv_freq.astype(np.float16).astype(np.float32))
    with pytest.raises(DataError, match=f"buffer {BETA} differs .* dtype float16"):
        check_buffer(source, rules[BETA], np.full(tensors[BETA].shape, 1e-3, np.float16))


def test_checked_cast_refuses_values_beyond_the_target_range():
    np.testing.assert_array_equal(checked_cast(np.arange(3), np.float32, file="f", key="k"), [0.0, 1.0, 2.0])
    with pytest.raises(DataError, match=r"f: tensor k \(float32, shape \(2,\)\) holds non-finite values \(1 beyond "
                                        r"the range of float16 of 2\); load it with a wider parameter dtype"):
        checked_cast(np.array([1.0, 1e5], np.float32), np.float16, file="f", key="k")


def test_adapter_files_in_half_precision_and_with_non_finite_values(tmp_path):
    config = AdapterConfig("lora", rank=2)
    rng = np.random.default_rng(2)
    weights = {"model": {"layer": {"lora_a": rng.standard_normal((2, 8)), "lora_b": rng.standard_normal((4, 2))}}}
    for dtype in DTYPES.values():
        _, loaded, _ = read_adapter(save_adapter(tmp_path / "half.safetensors", config, weights, dtype=dtype))
        for name in ("lora_a", "lora_b"):
            value = loaded["model"]["layer"][name]
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value, weights["model"]["layer"][name].astype(dtype).astype(np.float32))
    weights["model"]["layer"]["lora_b"][1, 1] = np.nan
    path = save_adapter(tmp_path / "nan.safetensors", config, weights, dtype=np.float16)
    with pytest.raises(DataError) as error:
        read_adapter(path)
    assert str(error.value).startswith(f"adapter file {path}: tensor model/layer/lora_b (float16, shape (4, 2)) holds "
                                       f"non-finite values (1 NaN of 8)")

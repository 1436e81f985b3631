"""launch.convert --from/--to=stable_audio_3 on checkpoints the reference code makes (tests/reference/sa3): a tiny
full model (SAME-S-structured autoencoder, medium-structured DiT with memory tokens, differential attention and the
inpainting input, a seconds_total conditioner standing in for T5Gemma, whose weights SA3 checkpoints never hold) and
an AE-only SAME, every weight redrawn. The converted checkpoints give the reference's first ping-pong step and its
decode; fp16 copies convert to the fp32 result within fp16 rounding; a NaN is refused by name; exports load into the
reference strictly and reproduce it; a reference LoRA file converts with the CLI, adapts the first step as the
reference's adapted model does, and exports back to the same tensors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch_file

from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.convert.stable_audio_3 import generation_flags
from musicdiff.convert.stage import convert_checkpoint
from musicdiff.errors import DataError
from musicdiff.models.weight_adapters import apply_adapters, load_adapter
from test_same import LATENT, RATIO, redraw
from test_same import reference_config as same_reference_config
from test_sa3_dit import reference_package, sa3  # noqa: F401  (fixtures: the reference, its ExpoFourier table ours)
from test_sa3_lora import add_reference_lora, save_reference_lora

pytestmark = pytest.mark.usefixtures("unsharded")

FRAMES, COND_DIM, SECONDS = 6, 64, 5.0
DIT = dict(io_channels=LATENT, embed_dim=128, depth=2, num_heads=2, cond_token_dim=COND_DIM, project_cond_tokens=True,
           global_cond_dim=COND_DIM, global_cond_type="adaLN", timestep_features_type="expo",
           timestep_features_dim=256, num_memory_tokens=4, local_add_cond_dim=LATENT + 1, norm_type="rms_norm",
           attn_kwargs=dict(qk_norm="rms", differential=True))


def full_model_config():
    return {"model_type": "diffusion_cond", "sample_rate": 44100, "sample_size": FRAMES * RATIO, "model": {
        "io_channels": LATENT,
        "pretransform": {"chunked": False, "iterate_batch": False, "config": same_reference_config("s")},
        "conditioning": {"cond_dim": COND_DIM, "configs": [{"id": "seconds_total", "type": "number", "config": dict(
            min_val=0, max_val=384, fourier_features_type="expo")}]},
        "diffusion": {"diffusion_objective": "rf_denoiser", "config": DIT,
                      "cross_attention_cond_ids": ["seconds_total"], "global_cond_ids": ["seconds_total"],
                      "local_add_cond_ids": ["inpaint_mask", "inpaint_masked_input"],
                      "sampling_distribution_shift_options": {"type": "full", "base_shift": 0.5, "max_shift": 1.15}}}}


def write_reference(directory, config, state, dtype=np.float32):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory / "model_config.json", directory / "model.safetensors"


@pytest.fixture(scope="module")
def reference_full(reference_package):
    """(config, reference ConditionedDiffusionModelWrapper in eval mode, its state dict) made by the reference
    factory from the model_config.json a released checkpoint would carry."""
    config = full_model_config()
    wrapper = redraw(reference_package.factory.create_diffusion_cond_from_config(config)).eval()
    state = {k: v.detach().numpy().copy() for k, v in wrapper.state_dict().items()}
    return config, wrapper, state


def convert(tmp_path, name, config, state, dtype=np.float32):
    model_config, checkpoint = write_reference(tmp_path / f"{name}_ref", config, state, dtype)
    convert_checkpoint(workdir=str(tmp_path / name), from_format="stable_audio_3", model_config=str(model_config),
                       checkpoint=str(checkpoint))
    return tmp_path / name


def first_step(reference, model, conditioner):
    """(reference, ours): x̂₀ = x − 1·v(x, t = 1) of a ping-pong sampler's first step from the same noise with the
    text-to-audio inputs (seconds_total, all-zero inpainting input)."""
    noise = np.random.default_rng(0).standard_normal((1, LATENT, FRAMES)).astype(np.float32)
    with torch.no_grad():
        cond = reference.conditioner([{"seconds_total": SECONDS}], "cpu")
        zeros = torch.zeros(1, 1, FRAMES)
        cond.update(inpaint_mask=(zeros,), inpaint_masked_input=(torch.zeros(1, LATENT, FRAMES),))
        expected = noise - reference(torch.as_tensor(noise), torch.ones(1), cond).numpy()
    ours_cond = conditioner.condition({"seconds_total": jnp.asarray([SECONDS])})
    return expected, np.asarray(jnp.asarray(noise) - model(jnp.asarray(noise), jnp.ones(1), ours_cond))


def converted_models(directory):
    diffusion = find_checkpoint(directory / "diffusion")
    return load_model(diffusion, "model"), load_model(diffusion, "conditioner")


def relative(got, expected):
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def test_a_reference_checkpoint_converts_and_takes_the_reference_first_step(sa3, reference_full, tmp_path,
                                                                             measurement, capsys):
    config, wrapper, state = reference_full
    directory = convert(tmp_path, "fp32", config, state)
    assert "--config.time_shift.name=full" in capsys.readouterr().out  # the reference's sampling shift, as flags
    expected, got = first_step(wrapper, *converted_models(directory))
    with torch.no_grad():
        expected_audio = wrapper.pretransform.decode(torch.as_tensor(expected)).numpy()
    autoencoder = load_model(find_checkpoint(directory / "autoencoder"), "autoencoder")
    audio = np.asarray(autoencoder.decode(jnp.asarray(got)))
    step_error, decode_error = relative(got, expected), relative(audio[..., :expected_audio.shape[-1]], expected_audio)
    measurement("first ping-pong step max|ours - ref| / max|ref|", step_error)
    measurement("its SAME decode max|ours - ref| / max|ref|", decode_error)
    assert step_error <= 1e-4 and decode_error <= 1e-4
    assert generation_flags(tmp_path / "fp32_ref" / "model_config.json")[0] == "--config.time_shift.name=full"


def test_fp16_copy_converts_within_fp16_rounding_and_nan_is_refused(reference_full, tmp_path, measurement):
    config, _, state = reference_full
    full = convert(tmp_path, "fp32", config, state)
    half = convert(tmp_path, "fp16", config, state, dtype=np.float16)
    for section, sub in (("model", "diffusion"), ("conditioner", "diffusion"), ("autoencoder", "autoencoder")):
        ours = nnx.state(load_model(find_checkpoint(full / sub), section), nnx.Param).to_pure_dict()
        halves = nnx.state(load_model(find_checkpoint(half / sub), section), nnx.Param).to_pure_dict()
        worst = 0.0
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(halves)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))  # fp16 rounding, nothing else
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 6.1e-5), initial=0.0)))
        measurement(f"{section}: largest relative fp16 - fp32 difference", worst)
        assert worst <= 2.0 ** -11
    bad = dict(state)
    key = "model.model.transformer.layers.1.self_attn.to_qkv.weight"
    bad[key] = bad[key].copy()
    bad[key][3, 5] = np.nan
    with pytest.raises(DataError, match=key.replace(".", r"\.")):
        convert(tmp_path, "nan", config, bad)
    assert not (tmp_path / "nan" / "autoencoder").exists()  # refused before anything was written


def test_export_loads_strictly_into_the_reference(reference_package, reference_full, tmp_path):
    config, wrapper, state = reference_full
    directory = convert(tmp_path, "fp32", config, state)
    convert_checkpoint(workdir=str(tmp_path / "export"), to_format="stable_audio_3",
                       diffusion=str(directory / "diffusion"))
    exported = json.loads((tmp_path / "export" / "model_config.json").read_text())
    rebuilt = reference_package.factory.create_diffusion_cond_from_config(exported).eval()
    rebuilt.load_state_dict(load_torch_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    for key, value in rebuilt.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)


def test_ae_only_same_converts_and_exports(reference_package, tmp_path):
    ae_config = same_reference_config("l")
    reference = redraw(reference_package.factory.create_autoencoder_from_config(ae_config, 44100)).eval()
    state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    config = {"model_type": "autoencoder", "sample_rate": 44100, "sample_size": 8 * RATIO, "model": ae_config}
    directory = convert(tmp_path, "same", config, state)
    assert not (directory / "diffusion").exists()
    convert_checkpoint(workdir=str(tmp_path / "export"), to_format="stable_audio_3",
                       autoencoder=str(directory / "autoencoder"))
    exported = json.loads((tmp_path / "export" / "model_config.json").read_text())
    assert exported["model_type"] == "autoencoder"
    rebuilt = reference_package.factory.create_autoencoder_from_config(exported["model"], 44100).eval()
    rebuilt.load_state_dict(load_torch_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    for key, value in rebuilt.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)


def test_a_reference_lora_file_converts_with_the_cli_and_back(sa3, reference_full, tmp_path, measurement):
    config, _, state = reference_full
    directory = convert(tmp_path, "fp32", config, state)
    adapted = redraw(sa3.factory.create_diffusion_cond_from_config(config)).eval()  # the same redrawn weights
    add_reference_lora(sa3, adapted, "dora-rows")
    save_reference_lora(sa3, adapted, "dora-rows", tmp_path / "lora.safetensors")
    convert_checkpoint(workdir=str(tmp_path / "adapter"), from_format="stable_audio_3",
                       lora=str(tmp_path / "lora.safetensors"), diffusion=str(directory / "diffusion"))
    model, conditioner = converted_models(directory)
    modules = {"model": model, "conditioner": conditioner}
    entry, weights = load_adapter(tmp_path / "adapter" / "adapter.safetensors", modules)
    split = {name: nnx.split(module, nnx.Param, ...) for name, module in modules.items()}
    params = apply_adapters({name: parts[1] for name, parts in split.items()}, [entry], [weights])
    model, conditioner = (nnx.merge(split[name][0], params[name], split[name][2]) for name in modules)
    expected, got = first_step(adapted, model, conditioner)
    error = relative(got, expected)
    measurement("DoRA-adapted first ping-pong step via the CLI, max|ours - ref| / max|ref|", error)
    assert error <= 1e-4
    convert_checkpoint(workdir=str(tmp_path / "back"), to_format="stable_audio_3",
                       lora=str(tmp_path / "adapter" / "adapter.safetensors"), diffusion=str(directory / "diffusion"))
    original, exported = (load_file(str(path)) for path in (tmp_path / "lora.safetensors",
                                                            tmp_path / "back" / "lora.safetensors"))
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)

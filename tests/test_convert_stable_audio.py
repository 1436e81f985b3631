"""Numerical parity of converted Stable Audio models against stable-audio-tools 0.0.19 (the test-only reference of
tests/reference/requirements.txt), plus export compatibility and the ours -> export -> import round trip.

The reference model is built by stable-audio-tools' own factory from a model_config.json with SAO 1.0's exact layer
structure and routing (Oobleck c_mults [1,2,4,8,16] / strides [2,4,4,8,8] with a VAE, a t5 prompt plus
seconds_start / seconds_total number conditioners as cross-attention tokens and the two timings as the global token,
a DiT with grouped-query cross-attention (kv heads = heads / 2) and partial rotary 32 of 64 head dims) at reduced
widths. Its t5-base is a one-layer random T5 of width 768 saved where the reference's from_pretrained("t5-base")
finds it (the working directory). Every reference parameter is re-drawn at random, zero-initialised output
projections included, so every path matters; the tests check that cross-attention, the global token and timing
move the output.

Parity modes (reference behaviours reproduced and documented in musicdiff.convert.stable_audio):
- the reference VAE always samples: compared are the pre-bottleneck mean/scale, the KL and the sample for the
  reference's own noise (recovered from its output);
- the reference DiT ignores the cross-attention mask: converted configs set use_cross_attn_mask=False;
- the reference runs T5 in float16: its T5 is cast to float32 here; fp32 everywhere, matmul precision "highest".
Tolerances: max |ours - reference| <= 1e-5 x max |reference| (autoencoder, conditioners), 1e-4 x (DiT).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("stable_audio_tools", reason="make test installs tests/reference/requirements.txt")

from stable_audio_tools.models.factory import create_model_from_config  # noqa: E402
from stable_audio_tools.models.utils import load_ckpt_state_dict  # noqa: E402

from musicdiff.convert.stable_audio import (  # noqa: E402
    export_stable_audio,
    import_stable_audio,
    read_model_config,
)
from musicdiff.diffusion.objectives import make_objective  # noqa: E402
from musicdiff.diffusion.parameterization import cfg_denoiser, make_denoiser  # noqa: E402
from musicdiff.diffusion.samplers import sample_dpmpp_3m_sde  # noqa: E402
from musicdiff.errors import DataError  # noqa: E402
from musicdiff.checkpoints import find_checkpoint, load_model  # noqa: E402
from musicdiff.inference.generate import guided_model  # noqa: E402
from musicdiff.models.conditioning import null_condition  # noqa: E402
from musicdiff.models.text_encoder import TextTokenizer, build_caption_tokenizer, load_t5_encoder  # noqa: E402
from tests.sao_fixtures import FRAMES, MAX_LENGTH, reduced_sao_config  # noqa: E402

# These tests call bare modules; model code needs a declared layout (musicdiff/parallel/sharding.py).
pytestmark = pytest.mark.usefixtures("unsharded")

AE_TOL, DIT_TOL = 1e-5, 1e-4
PROMPTS = ["a calm piano melody with soft strings", "drums"]
SECONDS_START, SECONDS_TOTAL = [3.0, 100.0], [30.0, 470.0]


def reduced_small_config() -> dict:
    """SAO Small's layout (spec §8.2): rf_denoiser, projected cond tokens, qk LayerNorm, seconds_total only."""
    config = reduced_sao_config()
    conditioning = config["model"]["conditioning"]
    conditioning["configs"] = [conditioning["configs"][0], dict(id="seconds_total", type="number",
                                                                config=dict(min_val=0, max_val=256))]
    diffusion = config["model"]["diffusion"]
    diffusion.update(cross_attention_cond_ids=["prompt", "seconds_total"], global_cond_ids=["seconds_total"],
                     diffusion_objective="rf_denoiser")
    diffusion["config"].update(embed_dim=128, num_heads=1, global_cond_dim=128, project_cond_tokens=True,
                               attn_kwargs=dict(qk_norm="ln"))
    return config


def max_rel(ours, reference) -> tuple[float, float]:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    scale = float(np.max(np.abs(reference)))
    return float(np.max(np.abs(ours - reference))), scale


def assert_parity(record, name: str, ours, reference, tol: float) -> None:
    """max |ours - reference| <= tol x max |reference|; the ratio goes to the run's "measured values" summary."""
    diff, scale = max_rel(ours, reference)
    print(f"{name}: max|diff| = {diff:.3e}, max|reference| = {scale:.3e}, ratio = {diff / scale:.3e} (tol {tol:g})")
    record(f"{name}: max|diff| / max|reference| (tol {tol:g})", diff / scale)
    assert scale > 0 and diff <= tol * scale, f"{name}: {diff:.3e} > {tol:g} x {scale:.3e}"


def randomize_(module: "torch.nn.Module", seed: int) -> None:
    """Re-draws every parameter so that no path is inert: weights ~ N(0, 1/fan_in) (zero-initialised output
    projections included), biases and snake log-scales ~ 0.1 N(0, 1), norm gains 1 + 0.1 N(0, 1), weight-norm gains
    (0.5 + |N(0, 1)|) / sqrt(fan-in), Fourier frequencies ~ N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight_g":  # effective conv weights of norm ~1/sqrt(fan-in): activations stay O(1)
                fan_in = params[name[:-1] + "v"][0].numel()
                param.copy_((0.5 + noise.abs()) / math.sqrt(fan_in))
            elif param.ndim >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif leaf in ("gamma",) or "norm" in name and leaf == "weight":
                param.copy_(1.0 + 0.1 * noise)
            elif leaf == "weights":  # NumberEmbedder Fourier frequencies
                param.copy_(noise)
            else:
                param.copy_(0.1 * noise)


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(2)
    yield
    jax.config.update("jax_default_matmul_precision", previous)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A random one-layer T5 of width 768 (t5-base's) plus a caption tokenizer, in a directory named t5-base."""
    from transformers import T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("t5")
    directory = root / "t5-base"
    build_caption_tokenizer(PROMPTS * 4 + ["ambient pads", "lo fi hip hop beat"], directory, vocab_size=300)
    torch.manual_seed(0)
    config = T5Config(vocab_size=300, d_model=768, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu")
    T5EncoderModel(config).save_pretrained(str(directory), safe_serialization=True)
    return directory


@contextlib.contextmanager
def working_directory(path: Path):
    import os

    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def build_reference(config: dict, t5_dir: Path, seed: int):
    with working_directory(t5_dir.parent):  # from_pretrained("t5-base") resolves to ./t5-base
        model = create_model_from_config(config)
    randomize_(model, seed)
    from transformers import T5EncoderModel

    for conditioner in model.conditioner.conditioners.values():
        if hasattr(conditioner, "tokenizer"):
            # The reference holds T5 in float16 (outside its state dict); parity is checked with the float32 T5.
            conditioner.__dict__["model"] = T5EncoderModel.from_pretrained(str(t5_dir)).eval()
    return model.eval()


@pytest.fixture(scope="module")
def converted(t5_dir, tmp_path_factory):
    """(reference model, our imported checkpoint dirs) for the reduced SAO 1.0 layout."""
    from safetensors.torch import save_file

    config = reduced_sao_config()
    reference = build_reference(config, t5_dir, seed=1)
    out = tmp_path_factory.mktemp("sao")
    (out / "model_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(out / "model.safetensors"))
    imported = import_stable_audio(out / "model_config.json", out / "model.safetensors", out / "converted",
                                   t5_path=str(t5_dir))
    return reference, imported, out


def reference_conditioning(reference, batch: int = 2) -> dict:
    metadata = [dict(prompt=PROMPTS[i], seconds_start=SECONDS_START[i], seconds_total=SECONDS_TOTAL[i])
                for i in range(batch)]
    with torch.no_grad():
        return reference.conditioner(metadata, "cpu")


def our_conditioning(conditioner, t5_dir: Path):
    tokenizer = TextTokenizer(t5_dir, MAX_LENGTH)
    t5 = load_t5_encoder(t5_dir)
    tokens = tokenizer(PROMPTS)
    embeddings, mask = t5(jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]))
    inputs = {"prompt": {"embeddings": embeddings, "mask": mask}}
    timings = dict(seconds_start=SECONDS_START, seconds_total=SECONDS_TOTAL)
    inputs.update({name: jnp.asarray(timings[name], jnp.float32) for name in conditioner.conditioners
                   if name != "prompt"})
    return conditioner.condition(inputs)


# ---- autoencoder ------------------------------------------------------------------------------------------------

def test_autoencoder_encode_decode_parity(measurement, converted):
    reference, imported, _ = converted
    ours = load_model(find_checkpoint(imported.autoencoder), "autoencoder")
    ae = reference.pretransform.model
    audio = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 2, 2048 * FRAMES)).astype(np.float32) * 0.5)
    with torch.no_grad():
        latents, info = ae.encode(audio, return_info=True)  # always samples
        decoded = reference.pretransform.decode(latents)
    encode = nnx.jit(lambda model, audio: (model.encode_features(jnp.swapaxes(audio, 1, 2)),
                                           *model.encode(audio, sample=False)))
    features, mean, kl = encode(ours, jnp.asarray(audio.numpy()))
    pre_bottleneck = info["pre_bottleneck_latents"].numpy()
    assert_parity(measurement, "encoder pre-bottleneck (mean | scale)", np.swapaxes(np.asarray(features), 1, 2), pre_bottleneck,
                  AE_TOL)
    assert_parity(measurement, "VAE mean", mean, pre_bottleneck[:, :8], AE_TOL)
    assert_parity(measurement, "VAE KL", kl["kl"], info["kl"].numpy(), AE_TOL)
    # The reference's own noise, recovered from its sample, through our std formula (softplus(scale) + 1e-4).
    ref_mean, ref_scale = np.split(pre_bottleneck, 2, axis=1)
    ref_std = np.log1p(np.exp(ref_scale)) + 1e-4
    noise = (latents.numpy() - ref_mean) / ref_std
    our_std = jax.nn.softplus(jnp.swapaxes(features, 1, 2)[:, 8:]) + 1e-4
    assert_parity(measurement, "VAE sample for the reference's noise", mean + our_std * noise, latents.numpy(), AE_TOL)
    decode = nnx.jit(lambda model, z: model.decode(z))
    assert_parity(measurement, "decoder", decode(ours, jnp.asarray(latents.numpy())), decoded.numpy(), AE_TOL)


# ---- conditioners -----------------------------------------------------------------------------------------------

def test_conditioner_parity_number_and_t5_projection(measurement, converted, t5_dir):
    reference, imported, _ = converted
    ref_cond = reference_conditioning(reference)
    conditioner = load_model(find_checkpoint(imported.diffusion), "conditioner")
    assert conditioner.conditioners["prompt"].project  # 768 -> 128 as the reference's proj_out
    tokenizer, t5 = TextTokenizer(t5_dir, MAX_LENGTH), load_t5_encoder(t5_dir)
    tokens = tokenizer(PROMPTS)
    embeddings, mask = t5(jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]))
    prompt, prompt_mask = conditioner.conditioners["prompt"]({"embeddings": embeddings, "mask": mask})
    assert_parity(measurement, "t5 conditioner (T5 + projection + pad zeroing)", prompt, ref_cond["prompt"][0].numpy(), AE_TOL)
    np.testing.assert_array_equal(np.asarray(prompt_mask), ref_cond["prompt"][1].numpy())
    for name, values in (("seconds_start", SECONDS_START), ("seconds_total", SECONDS_TOTAL)):
        tokens_, _ = conditioner.conditioners[name](jnp.asarray(values, jnp.float32))
        assert_parity(measurement, f"number conditioner {name}", tokens_, ref_cond[name][0].numpy(), AE_TOL)
    routed = our_conditioning(conditioner, t5_dir)
    ref_inputs = reference.get_conditioning_inputs(ref_cond)
    assert_parity(measurement, "routed cross-attention tokens", routed.cross_tokens, ref_inputs["cross_attn_cond"].numpy(), AE_TOL)
    assert_parity(measurement, "routed global embedding", routed.global_embed, ref_inputs["global_cond"].numpy(), AE_TOL)


# ---- DiT --------------------------------------------------------------------------------------------------------

def _dit_inputs(io_channels: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, io_channels, 16)).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    return x, t


def guided_dit(model, scale: float = 1.0, rescale: float = 0.0, implicit_null: bool = False):
    """(params, x, t, cond) -> our DiT output with classifier-free guidance (batch doubling, as the reference):
    explicit zero tokens through cfg_denoiser, or `implicit_null` as the samplers run it (generate.guided_model)."""
    graphdef = nnx.graphdef(model)

    def run(params, x, t, cond):
        model = nnx.merge(graphdef, params)
        if implicit_null:
            return guided_model(model, cond, scale, rescale)(x, t)

        return cfg_denoiser(model, cond, null_condition(cond), scale, rescale=rescale)(x, t)

    return run


@pytest.mark.parametrize("layout", ["sao", "sao_small"])
def test_dit_forward_parity_with_and_without_cfg(measurement, layout, converted, t5_dir, tmp_path):
    from safetensors.torch import save_file

    if layout == "sao":
        reference, imported, _ = converted
    else:
        config = reduced_small_config()
        reference = build_reference(config, t5_dir, seed=2)
        (tmp_path / "model_config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
        imported = import_stable_audio(tmp_path / "model_config.json", tmp_path / "model.safetensors",
                                       tmp_path / "converted", t5_path=str(t5_dir))
    ref_diffusion = find_checkpoint(imported.diffusion)
    model = load_model(ref_diffusion, "model")
    conditioner = load_model(ref_diffusion, "conditioner")
    cond = our_conditioning(conditioner, t5_dir)
    ref_cond = reference_conditioning(reference)
    x, t = _dit_inputs(model.config.io_channels)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    with torch.no_grad():
        plain = reference(xt, tt, cond=ref_cond).numpy()
        guided = reference(xt, tt, cond=ref_cond, cfg_scale=7.0).numpy()
        rescaled = reference(xt, tt, cond=ref_cond, cfg_scale=7.0, scale_phi=0.5).numpy()
        inputs = reference.get_conditioning_inputs(ref_cond)
        no_context = reference.model(xt, tt, cross_attn_cond=torch.zeros_like(inputs["cross_attn_cond"]),
                                     global_cond=inputs["global_cond"]).numpy()
        other_timing = reference(xt, tt, cond={**ref_cond, **{k: (v[0].flip(0), v[1]) for k, v in ref_cond.items()
                                                             if k.startswith("seconds")}}).numpy()
    # Every path matters: cross-attention and timing move the output materially.
    for name, other in (("cross-attention", no_context), ("timing (global token + cross tokens)", other_timing)):
        change, scale = max_rel(other, plain)
        print(f"{layout}: removing/changing {name} moves the reference output by {change / scale:.3f} x max")
        measurement(f"{layout}: reference output change without/with other {name} / max", change / scale)
        assert change > 0.05 * scale
    variants = (("", plain, 1.0, 0.0, False), (", CFG 7 (batch doubling)", guided, 7.0, 0.0, False),
                (", CFG 7 + rescale 0.5", rescaled, 7.0, 0.5, False),
                (", CFG 7, implicit null context (samplers)", guided, 7.0, 0.0, True))
    runs = [guided_dit(model, scale, rescale, implicit) for _, _, scale, rescale, implicit in variants]
    outputs = jax.jit(lambda *args: [run(*args) for run in runs])(nnx.state(model), jnp.asarray(x), jnp.asarray(t),
                                                                  cond)
    for (name, expected, *_), ours in zip(variants, outputs):
        assert_parity(measurement, f"{layout} DiT forward{name}", ours, expected, DIT_TOL)


def test_sampler_steps_parity_dpmpp_3m_sde(measurement, converted, t5_dir):
    """Two DPM++(3M) SDE steps (the SAO sampler) through k-diffusion's VDenoiser and the reference's in-model CFG,
    against our v-denoiser + cfg_denoiser + sampler, with the same Gaussian noise (ours, recovered from a run with
    a zero denoiser, fed to k-diffusion's noise_sampler)."""
    import k_diffusion as K

    reference, imported, _ = converted
    ref_diffusion = find_checkpoint(imported.diffusion)
    model, conditioner = load_model(ref_diffusion, "model"), load_model(ref_diffusion, "conditioner")
    cond = our_conditioning(conditioner, t5_dir)
    sigmas = K.sampling.get_sigmas_polyexponential(3, 0.3, 5.0, 1.0)[:3]  # 5 -> 1.22 -> 0.3: two noisy steps
    shape = (2, model.config.io_channels, 16)
    key = jax.random.key(7)
    start = np.random.default_rng(5).standard_normal(shape).astype(np.float32) * float(sigmas[0])
    our_sigmas = jnp.asarray(sigmas.numpy())

    def zero(x, alpha, sigma):
        return jnp.zeros_like(x)

    # With D = 0 and x = 0 a step is x' = e^{-2h} x + σ' sqrt(1 - e^{-2h}) z: solve for each step's z.
    h = np.log(sigmas.numpy()[:-1]) - np.log(sigmas.numpy()[1:])
    gain = sigmas.numpy()[1:] * np.sqrt(-np.expm1(-2 * h))
    x1 = np.asarray(sample_dpmpp_3m_sde(zero, jnp.zeros(shape), our_sigmas[:2], key))
    x2 = np.asarray(sample_dpmpp_3m_sde(zero, jnp.zeros(shape), our_sigmas, key))
    noises = [x1 / gain[0], (x2 - np.exp(-2 * h[1]) * x1) / gain[1]]

    ref_cond = reference_conditioning(reference)
    denoiser = K.external.VDenoiser(reference)
    steps = iter(noises)
    with torch.no_grad():
        expected = K.sampling.sample_dpmpp_3m_sde(
            denoiser, torch.from_numpy(start), sigmas, extra_args=dict(cond=ref_cond, cfg_scale=7.0), disable=True,
            noise_sampler=lambda sigma, sigma_next: torch.from_numpy(next(steps))).numpy()
    guided = guided_dit(model, 7.0)

    @jax.jit
    def sample(params, start, cond):
        model_fn = lambda x, t: guided(params, x, t, cond)
        return sample_dpmpp_3m_sde(make_denoiser(model_fn, make_objective({"name": "v"}).parameterization), start, our_sigmas, key)

    ours = sample(nnx.state(model), jnp.asarray(start), cond)
    assert_parity(measurement, "two DPM++ 3M SDE steps with CFG 7", ours, expected, DIT_TOL)


# ---- export -----------------------------------------------------------------------------------------------------

def test_export_loads_strictly_into_the_reference_with_identical_outputs(converted, t5_dir, tmp_path):
    reference, imported, _ = converted
    exported = export_stable_audio(tmp_path / "export", diffusion=imported.diffusion)
    config = read_model_config(exported.model_config)
    with working_directory(t5_dir.parent):
        rebuilt = create_model_from_config(config)
    state = load_ckpt_state_dict(str(exported.safetensors))
    rebuilt.load_state_dict(state, strict=True)  # what get_pretrained_model does
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key


def test_round_trip_ours_export_import_is_bit_identical(converted, tmp_path):
    """Our (randomised) checkpoints -> export -> import gives the same parameters bit for bit, and the same model
    sections of the configs."""
    from musicdiff.convert.stable_audio import plan_section, write_checkpoint

    _, imported, _ = converted
    ae_config, diffusion_config = (find_checkpoint(d).config for d in (imported.autoencoder, imported.diffusion))
    ours = tmp_path / "ours"
    diffusion_config.autoencoder_checkpoint = str(ours / "autoencoder")
    # Random values everywhere (no zero or symmetric tensor could hide a transposition) in our parameter trees.
    rng = np.random.default_rng(11)
    params = {}
    for name, config in (("autoencoder", ae_config), ("model", diffusion_config), ("conditioner", diffusion_config)):
        abstract = plan_section(name, config[name]).abstract
        params[name] = jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32), abstract)
    write_checkpoint(ours / "autoencoder", {"autoencoder": params["autoencoder"]}, ae_config)
    write_checkpoint(ours / "diffusion", {"model": params["model"], "conditioner": params["conditioner"]},
                     diffusion_config)

    exported = export_stable_audio(tmp_path / "export", diffusion=ours / "diffusion")
    again = import_stable_audio(exported.model_config, exported.safetensors, tmp_path / "again",
                                t5_path=diffusion_config.prompt_encoder.path)
    for directory, names, config in ((again.autoencoder, ("autoencoder",), ae_config),
                                     (again.diffusion, ("model", "conditioner"), diffusion_config)):
        ref = find_checkpoint(directory)
        for name in names:
            assert ref.config[name].to_dict() == config[name].to_dict(), name
            new = nnx.to_flat_state(nnx.state(load_model(ref, name), nnx.Param))
            old = dict(nnx.to_flat_state(params[name]))
            assert len(new) == len(old)
            for path, var in new:
                np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(old[path].get_value()))


# ---- CLI and refusals -------------------------------------------------------------------------------------------

def test_cli_imports_a_ckpt_then_an_autoencoder_exports(converted, tmp_path, repo_root):
    reference, _, out = converted
    torch.save({"state_dict": reference.state_dict()}, str(tmp_path / "model.ckpt"))
    run = lambda *args: subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=repo_root,
                                       capture_output=True, text=True, timeout=180)
    result = run("--from=stable_audio", f"--model_config={out / 'model_config.json'}",
                 f"--checkpoint={tmp_path / 'model.ckpt'}", f"--workdir={tmp_path / 'converted'}")
    assert result.returncode == 0, result.stderr
    assert "diffusion checkpoint" in result.stdout
    exported = export_stable_audio(tmp_path / "ae_export", autoencoder=tmp_path / "converted" / "autoencoder")
    config = read_model_config(exported.model_config)
    assert config["model_type"] == "autoencoder"
    state = load_ckpt_state_dict(str(exported.safetensors))
    expected = {k[len("pretransform.model."):]: v for k, v in reference.state_dict().items()
                if k.startswith("pretransform.model.")}
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in state)
    # A second import into the same workdir is refused rather than mixing checkpoints.
    with pytest.raises(DataError, match="already holds a checkpoint"):
        import_stable_audio(out / "model_config.json", tmp_path / "model.ckpt", tmp_path / "converted")


def test_unknown_missing_and_misshapen_keys_are_listed(converted, tmp_path):
    from safetensors.torch import save_file

    reference, _, out = converted
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    del state["model.model.transformer.layers.1.ff.ff.2.bias"]
    state["model.model.extra.weight"] = torch.zeros(3)
    state["conditioner.conditioners.seconds_total.embedder.embedding.1.bias"] = torch.zeros(5)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DataError) as err:
        import_stable_audio(out / "model_config.json", tmp_path / "bad.safetensors", tmp_path / "never")
    message = str(err.value)
    assert str(tmp_path / "bad.safetensors") in message
    assert "1 missing key(s): model.model.transformer.layers.1.ff.ff.2.bias" in message
    assert "1 unknown key(s): model.model.extra.weight" in message
    assert "seconds_total.embedder.embedding.1.bias (5,) (expected (128,))" in message
    assert not (tmp_path / "never").exists()

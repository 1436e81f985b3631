"""Oobleck autoencoder: layers against closed forms and numpy references of the PyTorch ops, bottleneck maths,
shapes and parameter count of SAO's VAE against the reference's state-dict shapes, chunked against unchunked."""

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import downsampling_ratio, load_config, validate
from musicdiff.models import registry
from musicdiff.models.autoencoder import BottleneckConfig, OobleckConfig, ResidualVQBottleneck, VAEBottleneck
from musicdiff.models.chunking import chunked_decode, chunked_encode, plan_chunks, receptive_radius_frames
from musicdiff.errors import ConfigError
from musicdiff.models.oobleck_layers import NearestUpsample1d, Snake, WNConv1d, WNConvTranspose1d, sin_squared

# These tests call bare modules; model code needs a declared layout (musicdiff/parallel/sharding.py).
pytestmark = pytest.mark.usefixtures("unsharded")

SPEC_SHAPES = Path("/work/shared/spec/sao_1_0_state_dict_shapes.json")
SAO_VAE_PARAMS = 156_112_514
CONFIG = "configs/autoencoder.py"


def model_config(preset, **overrides):
    config = load_config(f"{CONFIG}:{preset}").autoencoder
    with config.unlocked():
        config.update(overrides)
    return config


@functools.lru_cache(maxsize=None)
def built(preset, remat=False):
    """One model per (preset, remat) for the whole module; tests only read them."""
    return registry.build(model_config(preset, remat=remat), nnx.Rngs(0))


# ---------------------------------------------------------------- numpy references of the PyTorch ops


def torch_conv1d(x, w, b, stride=1, padding=0, dilation=1):
    """torch.nn.functional.conv1d on one item: x [in, L], w [out, in, k] (cross-correlation, zero padding)."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (padding, padding)))
    length = (xp.shape[1] - dilation * (k - 1) - 1) // stride + 1
    y = np.zeros((w.shape[0], length))
    for n in range(length):
        for j in range(k):
            y[:, n] += w[:, :, j] @ xp[:, n * stride + j * dilation]
    return y + (0 if b is None else b[:, None])


def torch_conv_transpose1d(x, w, b, stride, padding):
    """torch.nn.functional.conv_transpose1d on one item: x [in, L], w [in, out, k]; every input step scatters
    its kernel at l·stride, then `padding` samples are cut from both ends."""
    k, length = w.shape[2], x.shape[1]
    full = np.zeros((w.shape[1], (length - 1) * stride + k))
    for l in range(length):
        for j in range(k):
            full[:, l * stride + j] += w[:, :, j].T @ x[:, l]
    return full[:, padding:full.shape[1] - padding] + b[:, None]


def weight_norm(g, v):
    """PyTorch weight_norm(dim=0): g[0] · v / ||v|| with the norm over every axis but 0."""
    norm = np.sqrt(np.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))
    return g.reshape((-1,) + (1,) * (v.ndim - 1)) * v / norm


# ---------------------------------------------------------------- layers


def test_snake_closed_form():
    snake = Snake(2)
    snake.alpha.set_value(jnp.log(jnp.array([1.0, 2.0])))
    snake.beta.set_value(jnp.log(jnp.array([1.0, 0.5])))
    x = jnp.array([[[0.0, 0.5], [1.0, -1.0], [math.pi / 2, math.pi / 4]]])  # [B=1, T=3, C=2]
    got = np.asarray(snake(x))
    # y = x + sin²(a x) / b with (a, b) = (1, 1) for channel 0 and (2, 0.5) for channel 1.
    expected = np.array([[[0.0, 0.5 + 2 * math.sin(1.0) ** 2],
                          [1.0 + math.sin(1.0) ** 2, -1.0 + 2 * math.sin(-2.0) ** 2],
                          [math.pi / 2 + 1.0, math.pi / 4 + 2.0]]])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(expected[0, 2], [2.5707963, 2.7853982], rtol=1e-7)


def test_sin_squared_and_its_gradient_match_float64_sine():
    # Snake's sin² is a reduced polynomial: check it and its autodiff gradient, sin(2u), against numpy in float64
    # over the range activations reach, including the reduction's branch points (multiples of π/2).
    u = np.concatenate([np.linspace(-4000.0, 4000.0, 400_001), np.arange(-2000, 2001) * (math.pi / 2)])
    u = u.astype(np.float32)
    exact = np.sin(u.astype(np.float64)) ** 2
    np.testing.assert_allclose(np.asarray(jax.jit(sin_squared)(jnp.asarray(u))), exact, rtol=0, atol=4e-7)
    gradient = np.asarray(jax.jit(jax.vmap(jax.grad(sin_squared)))(jnp.asarray(u)))
    np.testing.assert_allclose(gradient, np.sin(2.0 * u.astype(np.float64)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,dilation,padding", [(7, 1, 1, 3), (7, 1, 3, 9), (8, 4, 1, 2), (3, 1, 1, 1)])
def test_weight_norm_conv_matches_torch_semantics(kernel, stride, dilation, padding):
    rng = np.random.default_rng(kernel * 10 + dilation)
    conv = WNConv1d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding, rngs=nnx.Rngs(0))
    v_torch = rng.normal(size=(4, 3, kernel))  # [out, in, k]
    g = rng.uniform(0.5, 2.0, size=4)
    bias = rng.normal(size=4)
    conv.weight_v.set_value(jnp.asarray(v_torch.transpose(2, 1, 0), jnp.float32))
    conv.weight_g.set_value(jnp.asarray(g, jnp.float32))
    conv.bias.set_value(jnp.asarray(bias, jnp.float32))
    w_torch = weight_norm(g, v_torch)
    np.testing.assert_allclose(np.asarray(conv.kernel()), w_torch.transpose(2, 1, 0), rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(3, 32))
    got = np.asarray(conv(jnp.asarray(x.T[None], jnp.float32)))[0].T
    np.testing.assert_allclose(got, torch_conv1d(x, w_torch, bias, stride, padding, dilation), rtol=1e-4, atol=1e-4)
    assert got.shape[1] == (32 // stride if stride > 1 else 32)


def test_conv1d_reference_agrees_with_np_convolve():
    """Anchors the loop reference itself: a valid, stride-1 conv1d is a sum of np.convolve with flipped kernels."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 20)), rng.normal(size=(3, 2, 5))
    via_convolve = np.stack([sum(np.convolve(x[i], w[o, i, ::-1], mode="valid") for i in range(2)) for o in range(3)])
    np.testing.assert_allclose(torch_conv1d(x, w, None), via_convolve, rtol=1e-12)
    conv = WNConv1d(2, 3, 5, padding=0, use_bias=False, rngs=nnx.Rngs(0))
    conv.weight_v.set_value(jnp.asarray(w.transpose(2, 1, 0), jnp.float32))
    conv.weight_g.set_value(jnp.asarray(np.sqrt(np.sum(w**2, axis=(1, 2))), jnp.float32))  # g = ||v||: w = v
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x.T[None], jnp.float32)))[0].T, via_convolve,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
def test_transposed_conv_matches_torch_semantics(stride):
    rng = np.random.default_rng(stride)
    kernel, padding, length = 2 * stride, math.ceil(stride / 2), 9
    conv = WNConvTranspose1d(5, 3, kernel, stride=stride, padding=padding, rngs=nnx.Rngs(0))
    v_torch = rng.normal(size=(5, 3, kernel))  # [in, out, k]
    g = rng.uniform(0.5, 2.0, size=5)  # per INPUT channel
    bias = rng.normal(size=3)
    conv.weight_v.set_value(jnp.asarray(v_torch.transpose(2, 0, 1), jnp.float32))
    conv.weight_g.set_value(jnp.asarray(g, jnp.float32))
    conv.bias.set_value(jnp.asarray(bias, jnp.float32))
    w_torch = weight_norm(g, v_torch)
    np.testing.assert_allclose(np.asarray(conv.kernel()), w_torch.transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(5, length))
    got = np.asarray(conv(jnp.asarray(x.T[None], jnp.float32)))[0].T
    expected = torch_conv_transpose1d(x, w_torch, bias, stride, padding)
    # PyTorch: (L - 1)·s - 2p + k = s·L for even s (kernel 2s, padding s/2), s·L - 1 for odd s.
    assert got.shape[1] == expected.shape[1] == conv.output_length(length) == stride * length - stride % 2
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def set_nearest_upsampler_weights(upsampler, w):
    """Sets the upsampler's conv to the torch-layout kernel w [out, in, k] (g = ||v||, so the kernel is w)."""
    upsampler.conv.weight_v.set_value(jnp.asarray(w.transpose(2, 1, 0), jnp.float32))
    upsampler.conv.weight_g.set_value(jnp.asarray(np.sqrt(np.sum(w**2, axis=(1, 2))), jnp.float32))


@pytest.mark.parametrize("stride", [2, 3, 8])
def test_nearest_upsampler_is_repeat_then_torch_same_conv(stride):
    # stable-audio-tools' use_nearest_upsample: nn.Upsample(nearest) then Conv1d(k 2s, padding='same', no bias);
    # torch's 'same' pads (k - 1) // 2 = s - 1 on the left and s on the right.
    rng = np.random.default_rng(stride)
    length = 7
    upsampler = NearestUpsample1d(5, 3, stride, rngs=nnx.Rngs(0))
    w = rng.normal(size=(3, 5, 2 * stride))
    set_nearest_upsampler_weights(upsampler, w)
    x = rng.normal(size=(5, length))
    repeated = np.pad(np.repeat(x, stride, axis=1), ((0, 0), (stride - 1, stride)))
    expected = torch_conv1d(repeated, w, None)
    got = np.asarray(upsampler(jnp.asarray(x.T[None], jnp.float32)))[0].T
    assert got.shape == expected.shape == (3, stride * length)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_constant_input_stays_constant_through_nearest_but_not_transposed_upsampling():
    # Why the "nearest" option exists: a transposed conv sums a different subset of taps at each output phase,
    # so a constant input comes out periodic at the input rate (the decoder's hum at the latent frame rate).
    stride, length = 4, 6
    rng = np.random.default_rng(0)
    c = rng.normal(size=5)
    x = jnp.asarray(np.tile(c, (1, length, 1)), jnp.float32)  # [1, L, 5], constant along time
    w = rng.normal(size=(3, 5, 2 * stride))  # [out, in, k]
    upsampler = NearestUpsample1d(5, 3, stride, rngs=nnx.Rngs(0))
    set_nearest_upsampler_weights(upsampler, w)
    interior = slice(stride - 1, stride * length - stride)  # outputs whose window lies inside the signal
    # Away from the padded ends every output sees 2s repeated copies of c: Σ_j w[:, :, j] @ c.
    nearest = np.asarray(upsampler(x))[0, interior]
    np.testing.assert_allclose(nearest, np.tile(w.sum(axis=2) @ c, (nearest.shape[0], 1)), rtol=1e-4, atol=1e-4)

    padding = stride // 2
    transposed = WNConvTranspose1d(5, 3, 2 * stride, stride=stride, padding=padding, rngs=nnx.Rngs(0))
    v = w.transpose(1, 0, 2)  # torch ConvTranspose1d layout [in, out, k]
    transposed.weight_v.set_value(jnp.asarray(v.transpose(2, 0, 1), jnp.float32))
    transposed.weight_g.set_value(jnp.asarray(np.sqrt(np.sum(v**2, axis=(1, 2))), jnp.float32))
    transposed.bias.set_value(jnp.zeros((3,), jnp.float32))
    # Output n = l·s − p + j: phase r = n mod s collects the taps j ≡ r + p (mod s).
    phases = np.stack([v[:, :, [(r + padding) % stride, (r + padding) % stride + stride]].sum(axis=2).T @ c
                       for r in range(stride)])
    got = np.asarray(transposed(x))[0, stride:stride * (length - 1)]  # whole periods inside the signal
    np.testing.assert_allclose(got, np.tile(phases, (length - 2, 1)), rtol=1e-4, atol=1e-4)
    assert np.ptp(phases, axis=0).min() > 0.1  # periodic, not constant


# ---------------------------------------------------------------- SAO sizes, checkpoint layout, describe


def sao_abstract_model():
    return nnx.eval_shape(lambda: registry.build(model_config("sao"), nnx.Rngs(0)))


def test_sao_shapes_per_stage():
    model = sao_abstract_model()
    graphdef, state = nnx.split(model)
    audio = jax.ShapeDtypeStruct((2, 2, 45056), jnp.float32)

    def stages(state, audio):
        model = nnx.merge(graphdef, state)
        x, shapes = jnp.swapaxes(audio, 1, 2), []
        for layer in model.encoder.layers:
            x = layer(x)
            shapes.append(x)
        latents, _ = model.encode(audio)
        return shapes, latents, model.decode(latents)

    shapes, latents, decoded = jax.eval_shape(stages, state, audio)
    # Spec §1.7 in NWC: [B, 45056, 128] → 22528 → 5632 → 1408 → 176 → 22 frames (2048×), then 128 channels.
    assert [s.shape for s in shapes] == [(2, 45056, 128), (2, 22528, 128), (2, 5632, 256), (2, 1408, 512),
                                         (2, 176, 1024), (2, 22, 2048), (2, 22, 2048), (2, 22, 128)]
    assert latents.shape == (2, 64, 22)
    assert decoded.shape == (2, 2, 45056)
    assert downsampling_ratio(model_config("sao")) == 2048


def reference_vae_shapes():
    shapes = json.loads(SPEC_SHAPES.read_text())
    prefix = "pretransform.model."
    return {key[len(prefix):]: tuple(shape) for key, shape in shapes.items() if key.startswith(prefix)}


def torch_shape(key, shape):
    """The PyTorch shape a parameter of ours corresponds to (layout rules of spec §9.5 / oobleck_layers)."""
    if key.endswith("weight_v"):
        k, fan_in, fan_out = shape
        transposed = re.fullmatch(r"decoder\.layers\.\d+\.layers\.1\.weight_v", key)
        return (fan_in, fan_out, k) if transposed else (fan_out, fan_in, k)
    if key.endswith("weight_g"):
        return (shape[0], 1, 1)
    return shape


def test_sao_parameter_count_and_checkpoint_keys_match_reference():
    reference = reference_vae_shapes()
    reference_count = sum(math.prod(shape) for shape in reference.values())
    assert reference_count == SAO_VAE_PARAMS
    params = nnx.to_flat_state(nnx.state(sao_abstract_model(), nnx.Param))
    ours = {".".join(map(str, path)): tuple(var.shape) for path, var in params}
    assert sum(math.prod(shape) for shape in ours.values()) == SAO_VAE_PARAMS
    assert set(ours) == set(reference)  # 183 encoder + 182 decoder keys, named as the reference's
    mismatched = {k: (torch_shape(k, s), reference[k]) for k, s in ours.items() if torch_shape(k, s) != reference[k]}
    assert not mismatched


def test_describe_cli_reports_sao_parameter_count(tmp_path, repo_root):
    result = subprocess.run(
        [sys.executable, "-m", "launch.describe", f"--config={CONFIG}:sao", f"--workdir={tmp_path}"],
        cwd=repo_root, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "describe.json").read_text())
    assert report["param_count"] == SAO_VAE_PARAMS
    assert report["models"]["autoencoder"]["modules"] == {"decoder": 78_122_626, "encoder": 77_989_888}
    assert "156,112,514" in result.stdout


def test_presets_load_and_validate(devices):
    for preset in ("sao", "tiny", "vq_tiny"):
        config = load_config(f"{CONFIG}:{preset}")
        validate(config, len(devices))
        assert config.data.sample_size % downsampling_ratio(config.autoencoder) == 0
    assert downsampling_ratio(model_config("tiny")) == 256
    with pytest.raises(Exception, match="antialias"):
        OobleckConfig.from_config(model_config("tiny", antialias=True))


def param_shapes(config):
    model = nnx.eval_shape(lambda: registry.build(config, nnx.Rngs(0)))
    return {".".join(map(str, path)): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_decoder_upsample_option_swaps_only_the_upsampling_layers():
    default = param_shapes(model_config("tiny"))
    assert sum(map(math.prod, default.values())) == 506_098  # configs/autoencoder.py's tiny, before the option
    assert param_shapes(model_config("tiny", decoder_upsample="transpose")) == default
    nearest = param_shapes(model_config("tiny", decoder_upsample="nearest"))
    # Blocks 1-4 of the decoder, widest first: (in, out, stride) from widths 16·[1, 1, 2, 4, 4], strides reversed.
    blocks = {1: (64, 64, 8), 2: (64, 32, 4), 3: (32, 16, 4), 4: (16, 16, 2)}
    transposed = {f"decoder.layers.{b}.layers.1.{name}" for b in blocks for name in ("weight_v", "weight_g", "bias")}
    assert set(default) - set(nearest) == transposed
    assert {k: v for k, v in nearest.items() if k not in default} == {
        **{f"decoder.layers.{b}.layers.1.conv.weight_v": (2 * s, cin, cout) for b, (cin, cout, s) in blocks.items()},
        **{f"decoder.layers.{b}.layers.1.conv.weight_g": (cout,) for b, (cin, cout, s) in blocks.items()},
    }
    # Same kernels, no bias, and a norm per output instead of per input channel.
    assert sum(map(math.prod, nearest.values())) == 506_098 - sum(cin for cin, _, _ in blocks.values())
    model = registry.build(model_config("tiny", decoder_upsample="nearest"), nnx.Rngs(0))
    assert model.decode(jnp.zeros((1, 64, 3))).shape == (1, 2, 3 * 256)
    with pytest.raises(ConfigError, match="decoder_upsample='linear'"):
        OobleckConfig.from_config(model_config("tiny", decoder_upsample="linear"))


# ---------------------------------------------------------------- bottlenecks


def test_vae_kl_and_sampling_follow_the_reference_formula():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 5, 8)).astype(np.float32)  # [B, F, 2·latent_dim]
    bottleneck = VAEBottleneck()
    mean_latents, info = bottleneck.encode(jnp.asarray(features))
    mean, scale = features[..., :4].astype(np.float64), features[..., 4:].astype(np.float64)
    std = np.log1p(np.exp(scale)) + 1e-4
    var = std**2
    expected_kl = np.mean(np.sum(mean**2 + var - np.log(var) - 1.0, axis=-1))  # no ½, summed over channels
    np.testing.assert_allclose(float(info["kl"]), expected_kl, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean_latents), mean, rtol=1e-6)
    key = jax.random.key(3)
    sampled, _ = bottleneck.encode(jnp.asarray(features), rng=key, sample=True)
    noise = np.asarray(jax.random.normal(key, (3, 5, 4), jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(sampled), mean + std * noise, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rng"):
        bottleneck.encode(jnp.asarray(features), sample=True)


def make_rvq(codebooks):
    stages, size, dim = codebooks.shape
    config = BottleneckConfig(type="rvq", codebook_size=size, num_quantizers=stages)
    bottleneck = ResidualVQBottleneck(dim, config, rngs=nnx.Rngs(0))
    for quantizer, codebook in zip(bottleneck.quantizers, codebooks):
        quantizer.codebook.set_value(jnp.asarray(codebook, jnp.float32))
    return bottleneck


def test_residual_vq_values_losses_and_usage():
    rng = np.random.default_rng(1)
    codebooks = rng.normal(size=(2, 8, 4))
    features = rng.normal(size=(2, 6, 4))
    latents, info = make_rvq(codebooks).encode(jnp.asarray(features, jnp.float32))
    residual, quantized, codebook_loss = features.copy(), np.zeros_like(features), 0.0
    for stage, codebook in enumerate(codebooks):
        codes = np.argmin(((residual[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
        np.testing.assert_array_equal(np.asarray(info["codes"][..., stage]), codes)
        chosen = codebook[codes]
        codebook_loss += np.mean((residual - chosen) ** 2)
        counts = np.bincount(codes.ravel(), minlength=8) / codes.size
        nonzero = counts[counts > 0]
        np.testing.assert_allclose(float(info["perplexity_per_quantizer"][stage]),
                                   np.exp(-np.sum(nonzero * np.log(nonzero))), rtol=1e-5)
        np.testing.assert_allclose(float(info["codes_used_fraction_per_quantizer"][stage]), len(nonzero) / 8)
        residual, quantized = residual - chosen, quantized + chosen
    np.testing.assert_allclose(np.asarray(latents), quantized, rtol=1e-5, atol=1e-5)
    # Forward values of the codebook and commitment terms coincide; only their gradients differ.
    np.testing.assert_allclose(float(info["commitment_loss"]), codebook_loss, rtol=1e-5)
    np.testing.assert_allclose(float(info["codebook_loss"]), codebook_loss, rtol=1e-5)
    np.testing.assert_allclose(float(info["quantizer_loss"]), 1.25 * codebook_loss, rtol=1e-5)


def test_vq_straight_through_and_commitment_gradients():
    rng = np.random.default_rng(2)
    codebooks = rng.normal(size=(2, 8, 4))
    features = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    bottleneck = make_rvq(codebooks)
    grad = jax.grad(lambda f: jnp.sum(weights * bottleneck.encode(f)[0]))(features)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(weights), rtol=1e-6)  # identity through the quantiser
    commitment_grad = jax.grad(lambda f: bottleneck.encode(f)[1]["commitment_loss"])(features)
    # d/dz Σ_i mean (r_i − c_i)² with r_i = z − Σ_{j<i} sg(c_j): Σ_i 2 (r_i − c_i) / N.
    residual, expected = np.asarray(features, np.float64), 0.0
    for codebook in codebooks:
        chosen = codebook[np.argmin(((residual[..., None, :] - codebook) ** 2).sum(-1), axis=-1)]
        expected = expected + 2.0 * (residual - chosen) / residual.size
        residual = residual - chosen
    np.testing.assert_allclose(np.asarray(commitment_grad), expected, rtol=1e-4, atol=1e-7)


def test_vq_model_roundtrip_and_codes():
    model = built("vq_tiny")
    audio = jax.random.normal(jax.random.key(0), (2, 2, 1000)) * 0.1
    latents, info = nnx.jit(lambda m, x: m.encode(x))(model, audio)
    assert latents.shape == (2, 32, 4) and info["codes"].shape == (2, 4, 4)  # 1000 samples pad to 4 × 256
    from_codes = model.bottleneck.codes_to_latents(info["codes"])
    np.testing.assert_allclose(np.asarray(from_codes), np.asarray(jnp.swapaxes(latents, 1, 2)), rtol=1e-5, atol=1e-5)
    assert 0.0 < float(info["codes_used_fraction"]) <= 1.0 and float(info["perplexity"]) >= 1.0
    assert nnx.jit(lambda m, z: m.decode(z))(model, latents).shape == (2, 2, 1024)


def test_training_pass_and_remat_gradients():
    audio = jax.random.normal(jax.random.key(0), (2, 2, 512)) * 0.1
    key = jax.random.key(1)

    def grads(remat):
        model = built("tiny", remat)

        def loss(model):
            decoded, info = model(audio, key)
            return jnp.mean(jnp.abs(decoded - audio)) + 1e-4 * info["kl"]

        return nnx.jit(nnx.grad(loss))(model)

    graphdef, state = nnx.split(built("tiny", True))
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).decode(jnp.zeros((1, 64, 1))))(state))
    assert jaxpr.count("remat") == 3 * 4  # every residual unit of the 4 decoder blocks is rematerialised
    plain, rematted = grads(False), grads(True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    model = built("tiny")
    decoded, info = nnx.jit(lambda m, x: m(x, key))(model, audio)
    assert decoded.shape == audio.shape and info["latents"].shape == (2, 64, 2) and info["kl"].shape == ()
    with pytest.raises(ValueError, match="rng"):
        model(audio)


# ---------------------------------------------------------------- chunking


def test_chunk_plan_tiles_the_signal():
    plan = plan_chunks(100, 32, 8)
    assert [s for s, _, _ in plan] == [0, 24, 48, 68]  # the last window ends at 100 instead of being padded
    assert plan[0][1] == 0 and plan[-1][2] == 100
    assert all(a[2] == b[1] for a, b in zip(plan[:-1], plan[1:]))
    for start, lo, hi in plan:  # kept frames stay overlap/2 away from edges other than the signal's own
        assert (lo == 0 or lo - start >= 4) and (hi == 100 or start + 32 - hi >= 4)
    assert plan_chunks(20, 32, 8) == [(0, 0, 20)]


def test_chunked_matches_unchunked_within_receptive_field_tolerance():
    model = built("tiny")
    ae = model.config
    encoder_radius, decoder_radius = receptive_radius_frames(ae, "encoder"), receptive_radius_frames(ae, "decoder")
    sao = OobleckConfig.from_config(model_config("sao"))
    # The reference's defaults (128 / 32) keep 16 frames of context, more than SAO's radii.
    assert 32 // 2 >= max(receptive_radius_frames(sao, "encoder"), receptive_radius_frames(sao, "decoder"))
    audio = jax.random.normal(jax.random.key(0), (1, 2, 256 * 100 + 37)) * 0.3
    key = jax.random.key(5)
    full, _ = nnx.jit(lambda m, x: m.encode(x, key, sample=True))(model, audio)
    chunked, info = chunked_encode(model, audio, key, chunk_frames=48, overlap_frames=2 * encoder_radius,
                                   sample=True)
    assert chunked.shape == full.shape == (1, 64, 101) and "kl" in info
    # Outside the receptive field nothing reaches a kept frame: only float32 rounding differs.
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5 * float(jnp.max(jnp.abs(full))))
    decoded = nnx.jit(lambda m, z: m.decode(z))(model, full)
    chunked_audio = chunked_decode(model, full, chunk_frames=48, overlap_frames=2 * decoder_radius)
    tolerance = 1e-5 * float(jnp.max(jnp.abs(decoded)))
    np.testing.assert_allclose(np.asarray(chunked_audio), np.asarray(decoded), atol=tolerance)
    # Too little overlap cuts into the receptive field: the seams become visible (the check above is not vacuous).
    seamed = chunked_decode(model, full, chunk_frames=48, overlap_frames=4)
    assert float(jnp.max(jnp.abs(seamed - decoded))) > 100 * tolerance

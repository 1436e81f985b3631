"""SAME autoencoder (musicdiff/models/same.py) against the Stable Audio 3 reference (tests/reference/sa3), built
from tiny configs with every weight redrawn, plus the key map, the linear cost of its attention, the parameter
counts of the released sizes and training through the autoencoder trainer."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from musicdiff.config import downsampling_ratio, load_config
from musicdiff.convert.same_keys import same_params_from_state_dict, same_state_dict_from_params
from musicdiff.describe import abstract_params, count
from musicdiff.errors import ConfigError, DataError
from musicdiff.models import registry
from musicdiff.models.same import SAMEConfig, chunked_decode, chunked_encode, reference_chunk_plan

pytestmark = pytest.mark.usefixtures("unsharded")

TOLERANCE = 1e-5  # of max |reference|
PATCH, STRIDE, WIDTH, LATENT, HEAD = 16, 4, 48, 8, 16  # width ≠ 2·PATCH, else the reference drops its mappings
RATIO = PATCH * STRIDE

# Two tiny autoencoders with the released models' structure (spec §2.4): (reference TRB kwargs, ours).
STRUCTURES = {
    "s": (dict(chunk_size=8, chunk_midpoint_shift=True),
          dict(encoder_mapping_kernel=1, decoder_mapping_kernel=3, decoder_sinusoidal_blocks=0, encoder_depth=2,
               decoder_depth=3, attention="chunked", chunk_size=8, chunk_midpoint_shift=True),
          dict(encoder_conv_mapping=False, decoder_conv_mapping=True, sinusoidal_blocks=0, depths=(2, 3))),
    "l": (dict(sliding_window=[1, 1]),
          dict(encoder_mapping_kernel=1, decoder_mapping_kernel=1, decoder_sinusoidal_blocks=3, encoder_depth=2,
               decoder_depth=3, attention="sliding_window", sliding_window=1),
          dict(encoder_conv_mapping=False, decoder_conv_mapping=False, sinusoidal_blocks=3, depths=(2, 3))),
}


def reference_config(structure):
    attention, _, extra = STRUCTURES[structure]
    common = dict(channels=WIDTH // 2, c_mults=[2], latent_dim=LATENT, strides=[STRIDE], dim_heads=HEAD,
                  differential=True, variable_stride=True, dyt=True, **attention)
    return {
        "encoder": {"config": dict(in_channels=2 * PATCH, transformer_depths=[extra["depths"][0]],
                                   conv_mapping=extra["encoder_conv_mapping"], **common)},
        "decoder": {"config": dict(out_channels=2 * PATCH, transformer_depths=[extra["depths"][1]],
                                   conv_mapping=extra["decoder_conv_mapping"],
                                   sinusoidal_blocks=[extra["sinusoidal_blocks"]], **common)},
        "bottleneck": {"config": dict(dim=LATENT, auto_scale=True)},
        "pretransform": {"config": dict(channels=2, patch_size=PATCH)},
        "latent_dim": LATENT, "downsampling_ratio": RATIO, "io_channels": 2,
    }


def our_config(structure):
    return ml_collections.ConfigDict(dict(
        name="same", patch_size=PATCH, strides=(STRIDE,), width=WIDTH, latent_dim=LATENT, head_dim=HEAD,
        differential=True, variable_stride=True, bottleneck=dict(type="softnorm"), **STRUCTURES[structure][1]))


def redraw(model):
    """Every parameter of the reference redrawn (zero-initialised outputs, DyT, bottleneck and new tokens too)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "alpha":
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif leaf in ("gamma", "scaling_factor", "weight_g"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif leaf == "running_std":
                p.fill_(1.7)
            elif p.ndim >= 2 and leaf != "new_tokens":
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def sa3():
    from sa3_reference import import_reference
    package = import_reference()
    # No flash-attn and no compiler for flex attention on CPU: the reference's chunked-halo SDPA fallback, which it
    # documents as math-equivalent, runs the sliding window.
    package.models.transformer.flex_attention_compiled = None
    return package


@pytest.fixture(scope="module", params=sorted(STRUCTURES))
def pair(request, sa3):
    """(structure, reference AudioAutoencoder in eval mode, our model with its weights, reference state dict)."""
    reference = redraw(sa3.factory.create_autoencoder_from_config(reference_config(request.param), 44100)).eval()
    state = {key: value.detach().numpy().copy() for key, value in reference.state_dict().items()}
    config = our_config(request.param)
    model = registry.build(config, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, same_params_from_state_dict(state, config))
    nnx.update(model, params)
    return request.param, reference, model, state


def relative_error(ours, reference):
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def audio_of(frames, seed, trim=0):
    rng = np.random.default_rng(seed)
    return (0.5 * rng.standard_normal((2, 2, frames * RATIO - trim))).astype(np.float32)


# Latent lengths: odd ones make SAME-S pad a frame (encode: the audio to 2-frame chunks; decode: the latents).
@pytest.mark.parametrize("frames", [6, 7])
def test_encode_and_decode_match_the_reference(pair, frames):
    structure, reference, model, _ = pair
    audio = audio_of(frames, frames, trim=37)  # not a multiple of the ratio: both zero-pad
    with torch.no_grad():
        expected_latents = reference.encode(torch.from_numpy(audio))
    latents, _ = model.encode(jnp.asarray(audio))
    assert latents.shape == (2, LATENT, frames)
    # The reference returns the padded frame too (SAME-S, odd frames); we keep ceil(T / ratio) frames.
    assert expected_latents.shape[-1] == (frames + frames % 2 if structure == "s" else frames)
    encode_error = relative_error(latents, expected_latents[..., :frames])

    z = np.random.default_rng(10 + frames).standard_normal((2, LATENT, frames)).astype(np.float32)
    with torch.no_grad():
        expected_audio = reference.decode(torch.from_numpy(z))
    decoded = model.decode(jnp.asarray(z))
    assert decoded.shape == (2, 2, frames * RATIO)
    decode_error = relative_error(decoded, expected_audio[..., :frames * RATIO])
    print(f"SAME-{structure.upper()} tiny, {frames} frames: encode {encode_error:.2e}, decode {decode_error:.2e} "
          f"of max|ref|")
    assert encode_error <= TOLERANCE and decode_error <= TOLERANCE


def test_chunked_encode_and_decode_match_the_reference_chunking(pair):
    """13 frames in windows of 5 with overlap 2: starts 0, 3, 6 and the end-anchored 8 (a longer last overlap), odd
    windows (SAME-S pads each); the receptive field exceeds the overlap, so the seams are the reference's own."""
    structure, reference, model, _ = pair
    z = np.random.default_rng(3).standard_normal((2, LATENT, 13)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode_audio(torch.from_numpy(z), chunked=True, chunk_size=5, overlap=2)
        unchunked = reference.decode(torch.from_numpy(z))[..., :13 * RATIO]
    ours = chunked_decode(model, jnp.asarray(z), chunk_frames=5, overlap_frames=2)
    decode_error = relative_error(ours, expected)
    assert relative_error(unchunked, expected.numpy()) > 1e-3  # the chunking is visible: the test can tell

    audio = audio_of(13, 4)
    with torch.no_grad():
        expected_latents = reference.encode_audio(torch.from_numpy(audio), chunked=True, chunk_size=5, overlap=2)
    latents, _ = chunked_encode(model, jnp.asarray(audio), chunk_frames=5, overlap_frames=2)
    encode_error = relative_error(latents, expected_latents)
    print(f"SAME-{structure.upper()} tiny chunked: encode {encode_error:.2e}, decode {decode_error:.2e} of max|ref|")
    assert encode_error <= TOLERANCE and decode_error <= TOLERANCE


def test_reference_chunk_plan_tiles_like_the_reference_loop():
    for total, chunk, overlap in [(13, 5, 2), (20, 8, 4), (16, 8, 3), (9, 4, 0), (7, 8, 2), (8, 8, 2)]:
        owner = np.full(total, -1)
        if total > chunk:  # the reference's loop: later windows overwrite earlier ones
            starts = list(range(0, total - chunk + 1, chunk - overlap))
            starts += [total - chunk] if starts[-1] != total - chunk else []
            for i, s in enumerate(starts):
                lo = 0 if i == 0 else overlap // 2
                hi = chunk if i == len(starts) - 1 else chunk - overlap // 2
                owner[s + lo:s + hi] = i
        else:
            owner[:] = 0
        plan = reference_chunk_plan(total, chunk, overlap)
        ours = np.concatenate([np.full(hi - lo, i) for i, (_, lo, hi) in enumerate(plan)])
        np.testing.assert_array_equal(ours, owner)


def test_softnorm_loss_and_running_std_in_training_match_the_reference(pair):
    structure, reference, model, _ = pair
    audio = audio_of(4, 5)
    reference.bottleneck.train()
    try:
        with torch.no_grad():
            latents, info = reference.encode(torch.from_numpy(audio), return_info=True)
        running = float(reference.bottleneck.running_std)
    finally:
        reference.bottleneck.eval()
        with torch.no_grad():
            reference.bottleneck.running_std.fill_(1.7)
    assert running != pytest.approx(1.7)
    trained = nnx.clone(model)  # the module fixture keeps its running std
    _, ours = trained(jnp.asarray(audio))
    loss_error = abs(float(ours["softnorm_loss"]) - float(info["softnorm_loss"])) / abs(float(info["softnorm_loss"]))
    print(f"SAME-{structure.upper()} tiny training pass: softnorm loss {loss_error:.2e} relative, running_std "
          f"{float(trained.bottleneck.running_std[0]):.7f} vs {running:.7f}")
    assert float(trained.bottleneck.running_std[0]) == pytest.approx(running, rel=1e-6)
    assert float(ours["running_std"]) == pytest.approx(running, rel=1e-6)
    assert loss_error <= 1e-5
    assert relative_error(ours["latents"], latents) <= TOLERANCE
    assert float(model.bottleneck.running_std[0]) == pytest.approx(1.7)


def test_export_reimport_round_trip_is_bitwise_and_errors_name_the_key(pair):
    structure, _, model, state = pair
    config = our_config(structure)
    exported = same_state_dict_from_params(nnx.state(model, nnx.Param), config, prefix="pretransform.model.")
    assert set(exported) == {f"pretransform.model.{key}" for key in state}
    for key, value in state.items():
        assert np.array_equal(exported[f"pretransform.model.{key}"], value), key
    extra = {**exported, "model.model.other": np.zeros(3)}  # outside the prefix: ignored
    again = same_params_from_state_dict(extra, config, prefix="pretransform.model.")
    ours = nnx.state(model, nnx.Param).to_pure_dict()
    assert jax.tree.structure(again) == jax.tree.structure(ours)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(ours)))

    missing = dict(state)
    del missing["decoder.layers.3.transformers.1.self_attn.to_qkv.weight"]
    with pytest.raises(DataError, match=r"decoder\.layers\.3\.transformers\.1\.self_attn\.to_qkv\.weight"):
        same_params_from_state_dict(missing, config)
    wrong = {**state, "encoder.layers.2.bias": np.zeros(LATENT + 1, np.float32)}
    with pytest.raises(DataError, match=r"encoder\.layers\.2\.bias has shape"):
        same_params_from_state_dict(wrong, config)
    bad = {**state, "bottleneck.bias": np.full((1, LATENT, 1), np.nan, np.float32)}
    with pytest.raises(DataError, match=r"bottleneck\.bias .*non-finite"):
        same_params_from_state_dict(bad, config)


# ---------------------------------------------------------------------------------------------- linear cost


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_attention_cost_grows_linearly_with_length(structure):
    """Compiled encode + decode flops at 64 and 256 frames: the ratio is the length ratio. At 256 frames the
    encoder's sequence is 4352 tokens, where full attention alone would cost ~15x the whole banded/chunked pass."""
    model = registry.build(our_config(structure), nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def flops(frames):
        def roundtrip(state, audio):
            m = nnx.merge(graphdef, state)
            return m.decode(m.encode(audio)[0])

        audio = jax.ShapeDtypeStruct((1, 2, frames * RATIO), jnp.float32)
        return jax.jit(roundtrip).lower(state, audio).compile().cost_analysis()["flops"]

    short, long = flops(64), flops(256)
    print(f"SAME-{structure.upper()} tiny encode+decode flops: {short:.4g} at 64 frames, {long:.4g} at 256, ratio "
          f"{long / short:.4f}")
    assert 3.8 <= long / short <= 4.2, (short, long)


# ---------------------------------------------------------------------------------------------- sizes


def block_params(width, head_dim, ff_mult, differential=True):
    """One SAME block from the released key shapes (spec §2.4): pre_norm and ff_norm {alpha (1), gamma, beta (D)},
    to_qkv (5D × D), q_norm and k_norm {alpha (1), gamma, beta (head_dim)}, to_out (D × D), ff.ff.0.proj
    (2·F × D + 2·F), ff.ff.2 (D × F + D), F = ff_mult · D; rope.inv_freq is a buffer."""
    inner = ff_mult * width
    norms = 2 * (1 + 2 * width) + 2 * (1 + 2 * head_dim)
    attention = (5 if differential else 3) * width * width + width * width
    return norms + attention + (2 * inner * width + 2 * inner) + (inner * width + width)


def released_count(width, depth_encoder, depth_decoder, decoder_kernel, latent=256, patch_channels=512):
    """Encoder: mapping weight_g (D,1,1) + weight_v (D,512,1) + bias (D), new_tokens (1,1,D), blocks, layers.2
    (256 × D + 256). Decoder: layers.1 (D × 256 + D), new_tokens, blocks, mapping weight_g (512,1,1) + weight_v
    (512,D,k) + bias (512). Bottleneck: scaling_factor, bias (1,256,1), running_std (1), noise_scaling_factor
    (1,0,1) = 0."""
    block = block_params(width, 64, 3)
    encoder = (width + patch_channels * width + width) + width + depth_encoder * block + (latent * width + latent)
    decoder = ((latent * width + width) + width + depth_decoder * block
               + (patch_channels + patch_channels * width * decoder_kernel + patch_channels))
    return encoder, decoder, 2 * latent + 1


@pytest.mark.parametrize("preset, shape", [("same_s", (768, 6, 6, 3)), ("same_l", (1536, 12, 12, 1))])
def test_released_sizes_count_as_the_key_shapes_say(preset, shape, capsys):
    config = load_config(f"configs/autoencoder.py:{preset}")
    assert downsampling_ratio(config.autoencoder) == 4096
    params = abstract_params(config.autoencoder)
    encoder, decoder, bottleneck = released_count(*shape)
    assert {k: count(v) for k, v in params.items()} == {"encoder": encoder, "decoder": decoder,
                                                        "bottleneck": bottleneck}
    print(f"{preset}: encoder {encoder:,}, decoder {decoder:,}, total {encoder + decoder + bottleneck:,}")


def test_describe_cli_prints_the_same_s_count(tmp_path, repo_root):
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "launch.describe", "--config=configs/autoencoder.py:same_s",
                             f"--workdir={tmp_path}"], cwd=repo_root, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert result.returncode == 0, result.stderr[-2000:]
    total = sum(released_count(768, 6, 6, 3))
    assert json.loads((tmp_path / "describe.json").read_text())["param_count"] == total
    assert f"{total:,}" in result.stdout


def test_bad_options_are_config_errors_naming_the_key():
    base = dict(our_config("s"))
    for key, value, match in [("chunk_size", 12, "chunk_size"), ("attention", "full", "attention"),
                              ("decoder_mapping_kernel", 5, "decoder_mapping_kernel"), ("strides", (4, 4), "strides"),
                              ("conformer", True, "conformer")]:
        with pytest.raises(ConfigError, match=match):
            SAMEConfig.from_config({**base, key: value})


# ---------------------------------------------------------------------------------------------- training


def test_same_tiny_trains_through_the_autoencoder_trainer(devices):
    """Warm-up generator, discriminator and generator steps of :same_tiny (the runner's compiled programs): finite
    losses, the softnorm term in the loss, and running_std moved by the training passes of both kinds of step."""
    from musicdiff.parallel import make_mesh, mesh_config
    from musicdiff.training import loop
    from musicdiff.training.autoencoder import AutoencoderTrainer

    config = load_config("configs/autoencoder.py:same_tiny", [
        "training.warmup_steps=1", "training.num_steps=3", "training.stft_fft_sizes=(256, 64)",
        "discriminator.n_ffts=(256,)", "discriminator.filters=4", "training.loss_weights.softnorm=1.0",
        "mesh.data=1"])
    trainer = AutoencoderTrainer(config)
    mesh = make_mesh(mesh_config(data=1), devices[:1])
    rules = config.sharding_rules
    state, shardings = loop.init_state(trainer.init_state, mesh, rules, jax.random.key(0))
    rng = np.random.default_rng(0)
    t = np.arange(config.data.sample_size) / 44100.0
    batch = {"audio": (0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000, (config.batch_size, 2, 1)) * t)
                       + 0.02 * rng.standard_normal((config.batch_size, 2, t.size))).astype(np.float32)}
    programs = loop.StepPrograms(trainer.step_kinds(), trainer.step, trainer.step_kind, shardings,
                                 loop.batch_shardings(batch, mesh, rules), mesh, rules, 0)
    stds = [float(state["params"]["autoencoder"]["bottleneck"]["running_std"][...][0])]
    for _ in range(3):
        state, metrics = programs(state, loop.shard_batch(batch, mesh, rules))
        metrics = jax.device_get(metrics)
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["softnorm_loss"])
        assert metrics["update_skipped"] == 0.0
        stds.append(float(state["params"]["autoencoder"]["bottleneck"]["running_std"][...][0]))
    assert metrics["loss"] > metrics["spectral"]  # softnorm (weight 1) is in the generator's loss
    assert all(a != b for a, b in zip(stds, stds[1:])), stds  # every step's training pass moves it
    assert stds[-1] == pytest.approx(float(metrics["running_std"]), rel=1e-6)


def test_latent_precompute_encodes_with_same(devices):
    """The precompute stage's window encoder (softnorm: no posterior, the bottleneck's latents), unchunked and
    chunked, against model.encode."""
    from musicdiff.inference.precompute.window_encoder import WindowEncoder
    from musicdiff.parallel import DEFAULT_SHARDING_RULES, make_mesh, mesh_config

    model = registry.build(load_config("configs/autoencoder.py:same_tiny").autoencoder, nnx.Rngs(1))
    mesh = make_mesh(mesh_config(data=1), devices[:1])
    audio = audio_of(32, 6)
    mask = np.ones(audio.shape[::2], np.float32)
    mask[1, 20 * RATIO:] = 0.0
    expected = np.asarray(model.encode(jnp.asarray(audio))[0])
    for chunk, overlap in [(0, 0), (16, 8)]:
        settings = ml_collections.ConfigDict(dict(dtype="float32", encode_chunk_frames=chunk,
                                                  encode_overlap_frames=overlap))
        out = WindowEncoder(model, mesh, DEFAULT_SHARDING_RULES, settings)(audio, mask)
        assert set(out) == {"latent_mean", "latent_mask"}
        assert relative_error(out["latent_mean"], expected) <= TOLERANCE, chunk
        np.testing.assert_array_equal(np.asarray(out["latent_mask"]).sum(axis=1), [32, 20])


def test_sharded_encode_decode_match_one_device(devices):
    """:same_tiny on data=2 x fsdp=2 x tensor=2 with the default rules: parameters are split by their logical
    names (width over fsdp, heads and the FF inner dim over tensor) and the round trip equals the unsharded one."""
    from musicdiff.parallel import DEFAULT_SHARDING_RULES, make_mesh, mesh_config
    from musicdiff.parallel.sharding import batch_sharding, param_shardings, sharding_context

    model = registry.build(load_config("configs/autoencoder.py:same_tiny").autoencoder, nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    audio = audio_of(8, 7)[[0, 1, 0, 1]]

    def roundtrip(params, audio):
        m = nnx.merge(graphdef, params)
        return m.decode(m.encode(audio)[0])

    expected = np.asarray(jax.jit(roundtrip)(params, audio))
    mesh = make_mesh(mesh_config(data=2, fsdp=2, tensor=2), devices)
    shardings = param_shardings(params, DEFAULT_SHARDING_RULES, mesh)
    qkv = shardings["decoder"]["layers"]["3"]["transformers"][0]["self_attn"]["to_qkv"]["kernel"]
    assert qkv.spec[0] == "fsdp" and qkv.spec[2] == "tensor"
    with sharding_context(mesh, DEFAULT_SHARDING_RULES):
        got = jax.jit(roundtrip)(jax.device_put(params, shardings),
                                 jax.device_put(audio, batch_sharding(mesh, DEFAULT_SHARDING_RULES)))
    assert relative_error(got, expected) <= TOLERANCE

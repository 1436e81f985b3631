"""Stable Audio 3's DiT and conditioning against the vendored reference (tests/reference/sa3, spec §3, §7, §13):
tiny small- and medium-structured DiTs with every weight redrawn, converted through convert/sa3_dit_keys.py, in eval
mode on equal-length batches (the reference's CPU attention only zeroes padded values, spec §3.4); padding semantics
against our own key masking; the schedule shifts; one ping-pong and one Euler + APG step; the released parameter
counts from the key shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.convert.sa3_dit_keys import (conditioner_params_from_state_dict, dit_params_from_state_dict,
                                            state_dict_from_conditioner_params, state_dict_from_dit_params)
from musicdiff.describe import abstract_params, count
from musicdiff.diffusion.parameterization import (LinearInterpolant, Parameterization, doubled_call, make_denoiser,
                                                  projected_guidance_denoiser)
from musicdiff.diffusion.sampler_steps import sample_pingpong, sample_rf_euler
from musicdiff.diffusion.time_shift import TimeShift, shifted_times
from musicdiff.errors import DataError
from musicdiff.models import registry
from musicdiff.models.conditioning import null_condition
from musicdiff.models.number_embedding import expo_fourier_features, expo_fourier_frequencies

torch = pytest.importorskip("torch")
from sa3_reference import import_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("unsharded")

BATCH, FRAMES, PROMPT_TOKENS = 2, 12, 6
SECONDS = [7.3, 400.0]  # the second is clamped to max_val 384
TIMES = [0.37, 0.91]


def sa3_tiny(differential=False):
    """:sa3_tiny with the prompt as SA3 has it: a frozen encoder's tokens (T5Gemma at the tiny width), learned pads."""
    config = load_config("configs/diffusion.py:sa3_tiny", [f"model.differential_attention={differential}"])
    width = config.conditioner.conditioning.cond_dim
    configs = list(config.conditioner.conditioning.configs)
    configs[0] = dict(id="prompt", type="t5gemma", config=dict(dim=width, padding_mode="learned"))
    config.conditioner.conditioning.configs = configs
    return config


def reference_wrapper(sa3, config):
    """ConditionedDiffusionModelWrapper(DiTWrapper, conditioner) with config's sizes and SA3's wiring (spec §3.3), a
    learned-padding Conditioner standing in for T5Gemma (whose weights are not in SA3 checkpoints)."""
    m, cond_dim = config.model, config.conditioner.conditioning.cond_dim
    dit = sa3.models.diffusion.DiTWrapper(
        "rectified_flow", io_channels=m.io_channels, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        cond_token_dim=m.cond_token_dim, project_cond_tokens=True, global_cond_dim=m.global_cond_dim,
        global_cond_type="adaLN", timestep_features_type="expo", timestep_features_dim=m.timestep_features_dim,
        num_memory_tokens=m.num_memory_tokens, local_add_cond_dim=m.local_cond_dim, norm_type="rms_norm",
        attn_kwargs=dict(qk_norm="rms", differential=m.differential_attention))
    conditioners = sa3.models.conditioners
    conditioner = conditioners.MultiConditioner({
        "prompt": conditioners.Conditioner(cond_dim, cond_dim, padding_mode="learned"),
        "seconds_total": conditioners.NumberConditioner(cond_dim, 0, 384, fourier_features_type="expo"),
    })
    wrapper = sa3.models.diffusion.ConditionedDiffusionModelWrapper(
        dit, conditioner, io_channels=m.io_channels, sample_rate=44100, min_input_length=1,
        diffusion_objective="rectified_flow", cross_attn_cond_ids=["prompt", "seconds_total"],
        global_cond_ids=["seconds_total"], local_add_cond_ids=["inpaint_mask", "inpaint_masked_input"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter redrawn, zero-initialised ones and norm gammas included
        for name, param in wrapper.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(1 + 0.2 * noise)
            elif param.ndim >= 2 and not name.endswith("memory_tokens"):
                param.copy_(noise / math.sqrt(param.shape[1]))
            else:
                param.copy_(0.3 * noise)
    return wrapper.eval()


def inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    channels, width = config.model.io_channels, config.conditioner.conditioning.cond_dim
    keep = (np.arange(FRAMES)[None, :] < np.array([[5], [9]])).astype(np.float32)[:, None, :]
    latents = rng.normal(size=(BATCH, channels, FRAMES)).astype(np.float32)
    return dict(x=rng.normal(size=(BATCH, channels, FRAMES)).astype(np.float32),
                prompt=rng.normal(size=(BATCH, PROMPT_TOKENS, width)).astype(np.float32),
                prompt_mask=np.arange(PROMPT_TOKENS)[None, :] < np.array([[4], [6]]),
                local=np.concatenate([keep, latents * keep], axis=1))


def reference_output(sa3, wrapper, batch, inpaint, t=TIMES):
    conditioners = wrapper.conditioner.conditioners
    with torch.no_grad():
        mask = torch.as_tensor(batch["prompt_mask"])
        prompt = conditioners["prompt"].apply_padding(torch.as_tensor(batch["prompt"]), mask)
        local = torch.as_tensor(batch["local"] if inpaint else np.zeros_like(batch["local"]))  # zeros: FULL_MASK
        cond = {"prompt": (prompt, mask), "seconds_total": conditioners["seconds_total"](SECONDS, device="cpu"),
                "inpaint_mask": (local[:, :1],), "inpaint_masked_input": (local[:, 1:],)}
        return wrapper(torch.as_tensor(batch["x"]), torch.tensor(t), cond).numpy(), cond


def ours(config, wrapper):
    state = {k: v.detach().numpy() for k, v in wrapper.state_dict().items()}
    model = registry.build(config.model, nnx.Rngs(1))
    conditioner = registry.build(config.conditioner, nnx.Rngs(2))
    nnx.update(model, dit_params_from_state_dict(state, config.model))
    nnx.update(conditioner, conditioner_params_from_state_dict(state, config.conditioner))
    return model, conditioner, state


def our_condition(conditioner, batch):
    return conditioner.condition({"prompt": {"embeddings": jnp.asarray(batch["prompt"]),
                                            "mask": jnp.asarray(batch["prompt_mask"])},
                                  "seconds_total": jnp.asarray(SECONDS)})


@pytest.fixture(scope="module")
def reference_package():
    return import_reference()


@pytest.fixture
def sa3(reference_package, monkeypatch):
    """The reference with its ExpoFourier frequencies replaced by ours (its own arithmetic otherwise). torch's float32
    linspace and exp leave 11 of the 128 frequencies one ulp from the correctly rounded values we use; at 1e4 Hz an
    ulp (~1e-3) turns the phase at t ~ 1 by ~6e-3 rad, which random weights amplify to ~5e-4 of the output (measured
    4.9e-4 at t = 0.37, 0.91), so the DiT tests would otherwise measure float32 rounding of a constant table.
    test_expo_features_match_the_reference bounds the difference itself."""

    def forward(self, t):
        t = t.float()[:, None] if t.dim() == 1 else t.float()
        freqs = torch.as_tensor(expo_fourier_frequencies(self.dim, self.min_freq, self.max_freq))
        args = t * freqs * 2 * math.pi
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    monkeypatch.setattr(reference_package.models.blocks.ExpoFourierFeatures, "forward", forward)
    return reference_package


def test_expo_features_match_the_reference(reference_package, measurement):
    features = reference_package.models.blocks.ExpoFourierFeatures(256)
    ramp = torch.linspace(0, 1, 128) * (math.log(1e4) - math.log(0.5)) + math.log(0.5)
    np.testing.assert_allclose(expo_fourier_frequencies(256), torch.exp(ramp).numpy(), rtol=2e-6)  # measured ≤ 13 ulp
    t = np.array([0.0, 0.013, 0.37, 0.91, 1.0], np.float32)
    expected = features(torch.as_tensor(t)).numpy()
    got = np.asarray(expo_fourier_features(jnp.asarray(t), 256))
    error = float(np.max(np.abs(got - expected)))
    measurement("ExpoFourier features max|ours - ref| over t in {0, .013, .37, .91, 1}", error)
    # One float32 ulp of the 1e4 frequency (9.8e-4) at t = 1 turns the phase by 2π·9.8e-4 = 6.1e-3 rad.
    assert error <= 2 * math.pi * 2 * 9.8e-4


@pytest.mark.parametrize("differential", [False, True], ids=["small", "medium"])
def test_dit_matches_the_reference(sa3, differential, measurement):
    config = sa3_tiny(differential)
    wrapper = reference_wrapper(sa3, config)
    model, conditioner, _ = ours(config, wrapper)
    batch = inputs(config)
    cond = our_condition(conditioner, batch)
    for inpaint in (False, True):
        expected, _ = reference_output(sa3, wrapper, batch, inpaint)
        local = jnp.asarray(batch["local"]) if inpaint else None  # None: zeros, text-to-audio
        got = np.asarray(model(jnp.asarray(batch["x"]), jnp.asarray(TIMES), cond, local_cond=local))
        error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
        measurement(f"max|ours - ref| / max|ref| ({'inpainting' if inpaint else 'text-to-audio'})", error)
        assert error <= 1e-4


def test_seconds_conditioner_and_padding_match_the_reference(sa3, measurement):
    config = sa3_tiny()
    wrapper = reference_wrapper(sa3, config)
    _, conditioner, state = ours(config, wrapper)
    batch = inputs(config)
    _, cond = reference_output(sa3, wrapper, batch, inpaint=False)
    outputs = conditioner({"prompt": {"embeddings": jnp.asarray(batch["prompt"]),
                                      "mask": jnp.asarray(batch["prompt_mask"])},
                           "seconds_total": jnp.asarray(SECONDS)})
    seconds = cond["seconds_total"][0].numpy()
    error = float(np.max(np.abs(np.asarray(outputs["seconds_total"][0]) - seconds)) / np.max(np.abs(seconds)))
    measurement("seconds token max|ours - ref| / max|ref|", error)
    assert error <= 1e-5
    np.testing.assert_array_equal(np.asarray(outputs["prompt"][0]), cond["prompt"][0].numpy())
    # The map goes both ways: exporting the converted parameters gives the reference's tensors back.
    exported = state_dict_from_conditioner_params(nnx.state(conditioner, nnx.Param), config.conditioner)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key])


def test_key_map_round_trips_and_names_the_first_bad_key(sa3):
    config = sa3_tiny(differential=True)
    wrapper = reference_wrapper(sa3, config)
    model, _, state = ours(config, wrapper)
    exported = state_dict_from_dit_params(nnx.state(model, nnx.Param), config.model)
    dit_keys = {k for k in state if k.startswith("model.model.")}
    assert set(exported) == dit_keys
    for key in dit_keys:
        np.testing.assert_array_equal(exported[key], state[key])
    missing = dict(state)
    del missing["model.model.transformer.layers.1.to_scale_shift_gate"]
    with pytest.raises(DataError, match=r"missing key model\.model\.transformer\.layers\.1\.to_scale_shift_gate"):
        dit_params_from_state_dict(missing, config.model)
    wrong = dict(state, **{"model.model.transformer.memory_tokens": np.zeros((3, 128), np.float32)})
    with pytest.raises(DataError, match=r"model\.model\.transformer\.memory_tokens has shape \(3, 128\)"):
        dit_params_from_state_dict(wrong, config.model)
    extra = dict(state, **{"model.model.transformer.layers.0.extra": np.zeros(2, np.float32)})
    with pytest.raises(DataError, match=r"model\.model\.transformer\.layers\.0\.extra is no tensor"):
        dit_params_from_state_dict(extra, config.model)


def test_padded_frames_do_not_reach_valid_outputs():
    config = sa3_tiny(differential=True)
    model = registry.build(config.model, nnx.Rngs(3))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, leaf.shape)
                                                   for k, leaf in zip(keys, leaves)]))
    conditioner = registry.build(config.conditioner, nnx.Rngs(5))
    batch = inputs(config)
    cond = our_condition(conditioner, batch)
    valid = jnp.arange(FRAMES)[None, :] < jnp.array([[7], [FRAMES]])
    x, local = jnp.asarray(batch["x"]), jnp.asarray(batch["local"])
    changed = jnp.where(valid[:, None, :], x, 100.0 * jnp.flip(x, axis=-1))
    changed_local = jnp.where(valid[:, None, :], local, 3.0)
    first = model(x, jnp.asarray(TIMES), cond, local_cond=local, padding_mask=valid)
    second = model(changed, jnp.asarray(TIMES), cond, local_cond=changed_local, padding_mask=valid)
    difference = jnp.max(jnp.abs(jnp.where(valid[:, None, :], first - second, 0.0)))
    assert float(difference) <= 1e-6 * float(jnp.max(jnp.abs(first)))


@pytest.mark.parametrize("case", ["full@100", "full@256", "full@1292", "full@5000", "flux", "logsnr", "logsnr_rate"])
def test_shifted_schedules_equal_the_reference(sa3, case):
    shifts = sa3.inference.distribution_shift
    name, _, length = case.partition("@")
    length = int(length or 1500)
    if name == "full":
        ours_shift, reference = TimeShift("full"), shifts.DistributionShift()
    elif name == "flux":
        ours_shift = TimeShift("flux", alpha_min=2.0, alpha_max=6.93)
        reference = shifts.FluxDistributionShift(alpha_min=2.0, alpha_max=6.93)
    else:
        rate = 1.0 if name == "logsnr_rate" else 0.0
        ours_shift = TimeShift("logsnr", rate=rate)
        reference = shifts.LogSNRShift(rate=rate, anchor_logsnr=-6.2, logsnr_end=2.0)
    expected = sa3.inference.sampling.build_schedule(8, dist_shift=reference, effective_seq_len=length).numpy()
    got = np.asarray(shifted_times(ours_shift, 8, 1.0, length))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-7)


def one_step_setup(sa3):
    config = sa3_tiny()
    wrapper = reference_wrapper(sa3, config)
    model, conditioner, _ = ours(config, wrapper)
    batch = inputs(config)
    _, reference_cond = reference_output(sa3, wrapper, batch, inpaint=True)
    cond = our_condition(conditioner, batch)
    local = jnp.asarray(batch["local"])
    model_fn = lambda x, t, c=cond: model(x, t, c, local_cond=jnp.concatenate([local] * (x.shape[0] // BATCH)))  # noqa: E731
    velocity = Parameterization(LinearInterpolant(), "velocity")
    return wrapper, wrapper.get_conditioning_inputs(reference_cond), batch, model_fn, cond, velocity


def test_pingpong_step_matches_the_reference_sampler(sa3, monkeypatch, measurement):
    wrapper, cond_inputs, batch, model_fn, _, velocity = one_step_setup(sa3)
    times = shifted_times(TimeShift("logsnr"), 2, 1.0, FRAMES)
    key = jax.random.key(7)
    x = jnp.asarray(batch["x"])
    # Our sampler's fresh noise of step 1: with a denoiser giving 0, x1 = t1 · z.
    z = sample_pingpong(lambda x, a, s: jnp.zeros_like(x), x, times[:2], key) / times[1]
    monkeypatch.setattr(sa3.inference.sampling.torch, "randn_like", lambda like: torch.as_tensor(np.asarray(z)))
    reference = sa3.inference.sampling.sample_diffusion(
        wrapper.model, torch.as_tensor(batch["x"]), cond_inputs, "rf_denoiser", steps=2, disable_tqdm=True,
        dist_shift=sa3.inference.distribution_shift.LogSNRShift(rate=0, anchor_logsnr=-6.2, logsnr_end=2.0),
        sampler_type="pingpong").numpy()
    got = np.asarray(sample_pingpong(make_denoiser(model_fn, velocity), x, times, key))
    error = float(np.max(np.abs(got - reference)) / np.max(np.abs(reference)))
    measurement("2-step ping-pong max|ours - ref| / max|ref|", error)
    assert error <= 1e-4


def test_euler_step_with_projected_guidance_matches_the_reference(sa3, measurement):
    """Base-model sampling: Euler with CFG 7 under APG (apg_scale 1: only the part of x̂0_c − x̂0_u orthogonal to
    x̂0_c), unconditional = the whole cross context zeroed, global and local inputs kept (spec §3.5, §7)."""
    wrapper, cond_inputs, batch, model_fn, cond, velocity = one_step_setup(sa3)
    reference = sa3.inference.sampling.sample_diffusion(
        wrapper.model, torch.as_tensor(batch["x"]), cond_inputs, "rectified_flow", steps=1, disable_tqdm=True,
        dist_shift=sa3.inference.distribution_shift.FluxDistributionShift(), cfg_scale=7.0,
        sampler_type="euler")  # α = 1: the grid [1, 0]
    doubled = make_denoiser(doubled_call(lambda x, t, c: model_fn(x, t, c), cond, null_condition(cond)), velocity)
    guided = projected_guidance_denoiser(doubled, 7.0)
    x = jnp.asarray(batch["x"])
    got = np.asarray(sample_rf_euler(guided, x, jnp.asarray([1.0, 0.0]), jax.random.key(0)))
    reference = reference.numpy()
    error = float(np.max(np.abs(got - reference)) / np.max(np.abs(reference)))
    measurement("Euler + APG (CFG 7) step max|ours - ref| / max|ref|", error)
    assert error <= 1e-4


def test_released_parameter_counts_from_the_key_shapes():
    """Spec §3.1/§9.2 and the MLX defs' shapes, written out (D width, N blocks, io 256, context 768, FF 4D, 64
    memory tokens, local input 257, head dim 64)."""

    def dit(D, N, differential):
        outside = ((256 * D + D) + (D * D + D)  # to_timestep_embed.{0,2} (bias)
                   + 2 * (768 * D + D * D)  # to_cond_embed, to_global_embed (no bias)
                   + 2 * 256 * 256)  # preprocess_conv, postprocess_conv (256, 256, 1)
        transformer = (2 * 256 * D  # project_in, project_out
                       + 64 * D  # memory_tokens
                       + (D * D + D) + (D * 6 * D + 6 * D))  # global_cond_embedder.{0,2}
        block = (6 * D  # to_scale_shift_gate
                 + 3 * D  # pre_norm, cross_attend_norm, ff_norm gammas
                 + (5 if differential else 3) * D * D + D * D + 2 * 64  # self_attn to_qkv, to_out, q/k_norm
                 + (2 if differential else 1) * D * D + (3 if differential else 2) * D * D + D * D + 2 * 64  # cross
                 + (D * 8 * D + 8 * D) + (4 * D * D + D)  # ff.ff.0.proj (value|gate), ff.ff.2
                 + (257 * D + D) + (D * D + D))  # to_local_embed.{0,2}
        return outside + transformer + N * block

    small, medium = dit(1024, 20, False), dit(1536, 24, True)
    assert small == 459_130_880  # tech report: 459M; README's 433M = this less the inpainting MLPs:
    assert small - 20 * (257 * 1024 + 1024 + 1024 * 1024 + 1024) == 432_855_040
    assert medium == 1_453_170_176  # README / report: 1.4B
    conditioner = (256 * 768 + 768) + 768  # seconds_total.embedder.embedding.1, prompt.padding_embedding
    for preset, expected in (("sa3_small", small), ("sa3_medium", medium)):
        config = load_config(f"configs/diffusion.py:{preset}")
        assert count(abstract_params(config.model)) == expected
        assert count(abstract_params(config.conditioner)) == conditioner

"""The DiT's additive local conditioning (the inpainting input, models/local_conditioning.py): parameter tree and
axis names, zero-init identity, the branch's closed form, patching, errors, FLOPs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.models import registry
from musicdiff.models.denoiser import LOCAL_CONDITIONING, ConditioningInputs, capabilities
from musicdiff.models.dit import dit_forward_flops
from musicdiff.models.local_conditioning import LocalEmbed, local_tokens
from tests.test_dit import normal, randomize

pytestmark = pytest.mark.usefixtures("unsharded")

C, L, E, DEPTH = 16, 16, 64, 2
D = C + 1


def model_config(**overrides):
    config = load_config("configs/diffusion.py:tiny")
    with config.unlocked():
        config.model.update(dict(io_channels=C, **overrides))
    return config.model


def param_names(model):
    return {"/".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def inputs(batch=2, tokens=8):
    x = normal(10, (batch, C, L))
    t = jnp.asarray([0.3, 0.8][:batch], jnp.float32)
    cond = ConditioningInputs(normal(12, (batch, tokens, 32)), jnp.ones((batch, tokens), bool), normal(13, (batch, 64)))
    return x, t, cond


call = nnx.jit(lambda model, x, t, cond, local: model(x, t, cond, local_cond=local))


@pytest.mark.parametrize("patch_size", [1, 2])
def test_parameter_tree_axis_names_and_capability(patch_size):
    base = registry.build(model_config(patch_size=patch_size), nnx.Rngs(0))
    local = registry.build(model_config(patch_size=patch_size, local_cond_dim=D), nnx.Rngs(0))
    assert set(param_names(registry.build(model_config(local_cond_dim=0), nnx.Rngs(0)))) == set(
        param_names(registry.build(model_config(), nnx.Rngs(0))))
    extra = {name: leaf for name, leaf in param_names(local).items() if name not in param_names(base)}
    expected_shapes = {"in_proj/kernel": (patch_size * D, E), "in_proj/bias": (E,), "out_proj/kernel": (E, E),
                       "out_proj/bias": (E,)}
    assert extra.keys() == {f"transformer/layers/{i}/to_local_embed/{k}" for i in range(DEPTH)
                            for k in expected_shapes}
    axes = {"in_proj/kernel": (None, "embed"), "in_proj/bias": ("embed",), "out_proj/kernel": ("mlp", "embed"),
            "out_proj/bias": ("embed",)}
    for name, leaf in extra.items():
        suffix = name.split("to_local_embed/")[1]
        assert leaf.shape == expected_shapes[suffix]
        assert tuple(leaf.get_metadata()["out_sharding"]) == axes[suffix]
        if suffix.startswith("out_proj"):
            assert not np.asarray(leaf).any()  # zero-initialised output
    assert LOCAL_CONDITIONING in capabilities(local) and LOCAL_CONDITIONING not in capabilities(base)
    assert param_names(base).keys() <= param_names(local).keys()


@pytest.mark.parametrize("block_type", ["sao", "adaln_zero"])
def test_a_fresh_local_input_changes_nothing_and_a_trained_one_does(block_type):
    base = randomize(registry.build(model_config(block_type=block_type), nnx.Rngs(0)))
    local = registry.build(model_config(block_type=block_type, local_cond_dim=D), nnx.Rngs(0))
    nnx.update(local, nnx.state(base, nnx.Param))  # same weights; to_local_embed keeps its zero output init
    x, t, cond = inputs()
    features = normal(20, (2, D, L))
    reference = nnx.jit(lambda m: m(x, t, cond))(base)
    np.testing.assert_array_equal(call(local, x, t, cond, features), reference)
    np.testing.assert_array_equal(call(local, x, t, cond, None), reference)
    randomize(local, seed=2)
    with_features, without = call(local, x, t, cond, features), call(local, x, t, cond, None)
    assert float(jnp.max(jnp.abs(with_features - without))) > 1e-3
    # None is the all-zero input (text-to-audio), not "skip the branch"
    np.testing.assert_array_equal(without, call(local, x, t, cond, jnp.zeros((2, D, L))))


def test_local_embed_closed_form_with_a_zero_prepended_token():
    module = randomize(LocalEmbed(3, 4, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32))
    local = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    params = {k: np.asarray(v) for k, v in param_names(module).items()}
    hidden = local @ params["in_proj/kernel"] + params["in_proj/bias"]
    hidden = hidden / (1.0 + np.exp(-hidden))  # SiLU
    expected = hidden @ params["out_proj/kernel"] + params["out_proj/bias"]
    out = np.asarray(module(jnp.asarray(local), prepend_length=1))
    assert out.shape == (2, 6, 4)
    np.testing.assert_array_equal(out[:, 0], np.zeros((2, 4)))
    np.testing.assert_allclose(out[:, 1:], expected, rtol=1e-5, atol=1e-6)


def test_local_tokens_are_patched_like_the_latents():
    local = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)  # [B, D, L]
    tokens = np.asarray(local_tokens(jnp.asarray(local), 3, 2, 8, 2, jnp.float32))
    # token j holds frames 2j, 2j+1, frame-major: [frame 2j's 3 channels, frame 2j+1's 3 channels]
    expected = np.stack([np.concatenate([local[:, :, 2 * j], local[:, :, 2 * j + 1]], axis=1) for j in range(4)], 1)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(np.asarray(local_tokens(None, 3, 2, 8, 2, jnp.float32)), np.zeros((2, 4, 6)))


def test_errors_and_flops():
    base = registry.build(model_config(), nnx.Rngs(0))
    local = registry.build(model_config(local_cond_dim=D), nnx.Rngs(0))
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="local_cond_dim is 0"):
        base(x, t, cond, local_cond=jnp.zeros((2, D, L)))
    with pytest.raises(ValueError, match=r"local_cond has shape \(2, 5, 16\)"):
        local(x, t, cond, local_cond=jnp.zeros((2, 5, L)))
    with pytest.raises(ConfigError, match="config.model.local_cond_dim=-1"):
        registry.build(model_config(local_cond_dim=-1), nnx.Rngs(0))
    extra = dit_forward_flops(model_config(local_cond_dim=D), 3, L, 8) - dit_forward_flops(model_config(), 3, L, 8)
    assert extra == 3 * DEPTH * 2 * L * (D * E + E * E)

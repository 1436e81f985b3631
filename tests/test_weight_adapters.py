"""Weight adapters (musicdiff/models/weight_adapters.py) against hand-computed matrices and exact identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.models import registry
from musicdiff.parallel.sharding import unsharded
from musicdiff.models.weight_adapters import (AdapterConfig, StackEntry, apply_adapters, find_targets, init_adapter,
                                              layer_tensors, load_adapter, merge_adapters, parameter_count,
                                              parse_adapter_specs, save_adapter)
from tests.model_fixtures import REPO


class Toy(nnx.Module):
    """A Dense [3 -> 2] and a 1-D conv (kernel 2, 2 -> 2 channels) with known weights."""

    def __init__(self):
        self.dense = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        self.dense.kernel[...] = jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]])  # [in, out]
        self.conv = nnx.Conv(2, 2, kernel_size=(2,), padding="VALID", use_bias=False, rngs=nnx.Rngs(1))
        self.conv.kernel[...] = jnp.array([[[1.0, 2.0], [3.0, -1.0]], [[0.5, -0.5], [2.0, 1.0]]])  # [k, in, out]

    def __call__(self, x, y):
        return self.dense(x), self.conv(y)


def toy_params():
    toy = Toy()
    return toy, {"toy": nnx.state(toy, nnx.Param)}


def run_toy(toy, params, x, y):
    return nnx.merge(nnx.graphdef(toy), params["toy"])(x, y)


X = jnp.array([[0.3, -1.0, 2.0], [1.0, 0.5, -0.5]])
Y = jnp.arange(12.0).reshape(2, 3, 2) / 7.0


def torch_view(kernel):
    """[in..., out] kernel -> the PyTorch [out, in] matrix (C-order over the in axes)."""
    kernel = np.asarray(kernel, np.float64)
    return kernel.reshape(-1, kernel.shape[-1]).T


def entry(config, toy, strength=1.0, interval=None):
    return StackEntry(config, find_targets({"toy": toy}, config), strength, interval)


def with_tensors(config, toy, params, **tensors):
    """Adapter weights for the dense layer only, with given tensors."""
    cfg = AdapterConfig(**{**config.__dict__, "include": ("toy/dense",)})
    weights = init_adapter(jax.random.key(0), cfg, find_targets({"toy": toy}, cfg), params)
    weights["toy"]["dense"].update({k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()})
    return cfg, weights


A = np.array([[0.2, -0.1, 0.4], [0.3, 0.5, -0.2]])  # [r=2, in=3]
B = np.array([[1.0, -0.5], [0.25, 2.0]])  # [out=2, r=2]


def test_lora_matches_the_hand_computed_update():
    toy, params = toy_params()
    config, weights = with_tensors(AdapterConfig("lora", rank=2, alpha=4.0), toy, params, lora_a=A, lora_b=B)
    adapted = apply_adapters(params, [entry(config, toy, strength=0.5)], [weights])
    expected = torch_view(params["toy"]["dense"]["kernel"][...]) + (4.0 / 2) * 0.5 * B @ A
    np.testing.assert_allclose(torch_view(adapted["toy"]["dense"]["kernel"][...]), expected, rtol=1e-6)


def test_dora_matches_the_hand_computed_update():
    toy, params = toy_params()
    magnitude = np.array([2.0, 0.5])
    config, weights = with_tensors(AdapterConfig("dora", rank=2), toy, params, lora_a=A, lora_b=B,
                                   magnitude=magnitude)
    adapted = apply_adapters(params, [entry(config, toy)], [weights])
    v = torch_view(params["toy"]["dense"]["kernel"][...]) + B @ A
    expected = magnitude[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)  # norm over the inputs per row
    np.testing.assert_allclose(torch_view(adapted["toy"]["dense"]["kernel"][...]), expected, rtol=1e-6)
    # A fresh DoRA starts from m = ‖W‖ per row
    fresh = init_adapter(jax.random.key(0), config, find_targets({"toy": toy}, config), params)
    np.testing.assert_allclose(fresh["toy"]["dense"]["magnitude"],
                               np.linalg.norm(torch_view(params["toy"]["dense"]["kernel"][...]), axis=1), rtol=1e-6)


def test_lora_xs_bases_and_update_match_numpy_svd():
    toy, params = toy_params()
    config = AdapterConfig("lora_xs", rank=2, alpha=2.0, include=("toy/dense",))
    weights = init_adapter(jax.random.key(0), config, find_targets({"toy": toy}, config), params)
    w = torch_view(params["toy"]["dense"]["kernel"][...])  # [out=2, in=3]
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    u, v = u[:, :2], vt[:2].T
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), range(2)])
    np.testing.assert_allclose(weights["toy"]["dense"]["xs_u"], u * signs, atol=1e-6)
    np.testing.assert_allclose(weights["toy"]["dense"]["xs_v"], v * signs, atol=1e-6)
    m = np.array([[0.5, -1.0], [2.0, 0.25]])
    weights["toy"]["dense"]["xs_m"] = jnp.asarray(m, jnp.float32)
    adapted = apply_adapters(params, [entry(config, toy)], [weights])
    expected = w + (u * signs) @ m @ (v * signs).T
    np.testing.assert_allclose(torch_view(adapted["toy"]["dense"]["kernel"][...]), expected, atol=1e-6)


def test_conv_kernels_are_read_as_k_times_in_by_out():
    toy, params = toy_params()
    config = AdapterConfig("lora", rank=1, include=("toy/conv",))
    weights = init_adapter(jax.random.key(0), config, find_targets({"toy": toy}, config), params)
    a = np.array([[1.0, 0.0, -1.0, 2.0]])  # [1, k·in]
    b = np.array([[0.5], [1.0]])  # [out, 1]
    weights["toy"]["conv"].update(lora_a=jnp.asarray(a, jnp.float32), lora_b=jnp.asarray(b, jnp.float32))
    adapted = apply_adapters(params, [entry(config, toy)], [weights])
    kernel = np.asarray(params["toy"]["conv"]["kernel"][...])
    expected = kernel + (b @ a).T.reshape(kernel.shape)
    np.testing.assert_allclose(adapted["toy"]["conv"]["kernel"][...], expected, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_dit():
    config = load_config(str(REPO / "configs" / "diffusion.py") + ":tiny")
    model = registry.build(config.model, nnx.Rngs(0))
    params = {"model": nnx.state(model, nnx.Param)}
    # Every kernel non-zero, so that adapters reach the output through every layer.
    params = jax.tree.map(lambda x: x if x.any() else 0.05 * jnp.ones_like(x), params)
    key = jax.random.key(3)
    x = jax.random.normal(key, (2, config.model.io_channels, 32))
    t = jnp.array([0.3, 0.7])
    return model, params, x, t


def dit_out(tiny_dit, params):
    model, _, x, t = tiny_dit
    with unsharded():
        return np.asarray(nnx.merge(nnx.graphdef(model), params["model"])(x, t, None))


def trained_like(weights, seed=1):
    """Every adapter tensor replaced by a random non-zero draw (as after training)."""
    leaves, treedef = jax.tree.flatten(weights)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) + (x if x.ndim == 1 else 0)
                                        for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("kind", ["lora", "dora", "lora_xs"])
def test_fresh_adapters_and_strength_zero_leave_outputs_bitwise_equal(tiny_dit, kind):
    model, params, _, _ = tiny_dit
    config = AdapterConfig(kind, rank=4)
    targets = find_targets({"model": model}, config)
    base = dit_out(tiny_dit, params)
    fresh = init_adapter(jax.random.key(0), config, targets, params)  # B = 0 (LoRA, DoRA) / M = 0 (LoRA-XS)
    np.testing.assert_array_equal(dit_out(tiny_dit, apply_adapters(params, [StackEntry(config, targets)], [fresh])),
                                  base)
    trained = trained_like(fresh)
    adapted = dit_out(tiny_dit, apply_adapters(params, [StackEntry(config, targets)], [trained]))
    assert np.max(np.abs(adapted - base)) > 1e-3  # the trained adapter changes the output...
    for strength in (0.0, jnp.float32(0.0)):  # ...and strength 0 (static or traced) gives the base back exactly
        off = apply_adapters(params, [StackEntry(config, targets, strength)], [trained])
        np.testing.assert_array_equal(dit_out(tiny_dit, off), base)


@pytest.mark.parametrize("kind", ["lora", "dora", "lora_xs"])
def test_merged_and_unmerged_agree(tiny_dit, kind):
    model, params, _, _ = tiny_dit
    config = AdapterConfig(kind, rank=4, alpha=8.0)
    targets = find_targets({"model": model}, config)
    trained = trained_like(init_adapter(jax.random.key(0), config, targets, params))
    stack = [StackEntry(config, targets, 0.7)]
    unmerged = dit_out(tiny_dit, apply_adapters(params, stack, [trained]))
    merged_params = merge_adapters(params, stack, [trained])
    assert jax.tree.map(lambda a: a.dtype, merged_params) == jax.tree.map(lambda a: a.dtype, params)
    np.testing.assert_allclose(dit_out(tiny_dit, merged_params), unmerged, atol=1e-5 * np.max(np.abs(unmerged)))


def test_two_stacked_loras_equal_the_sum_of_their_deltas(tiny_dit):
    model, params, _, _ = tiny_dit
    first = AdapterConfig("lora", rank=2, include=("model/transformer/*",))
    second = AdapterConfig("lora", rank=3, alpha=6.0, include=("model/transformer/layers/1/*", "model/to_*"))
    entries = [StackEntry(c, find_targets({"model": model}, c), s) for c, s in ((first, 0.8), (second, 1.5))]
    weights = [trained_like(init_adapter(jax.random.key(i), e.config, e.targets, params), seed=i + 5)
               for i, e in enumerate(entries)]
    stacked = apply_adapters(params, entries, weights)
    one = apply_adapters(params, entries[:1], weights[:1])
    two = apply_adapters(params, entries[1:], weights[1:])
    expected = jax.tree.map(lambda p, a, b: p + (a - p) + (b - p), params, one, two)
    for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_interval_switches_an_adapter_by_model_time(tiny_dit):
    model, params, _, _ = tiny_dit
    config = AdapterConfig("lora", rank=2)
    targets = find_targets({"model": model}, config)
    trained = trained_like(init_adapter(jax.random.key(0), config, targets, params))
    inside = apply_adapters(params, [StackEntry(config, targets, 1.0, (0.2, 0.6))], [trained], t=jnp.array([0.5]))
    outside = apply_adapters(params, [StackEntry(config, targets, 1.0, (0.2, 0.6))], [trained], t=jnp.array([0.9]))
    always = apply_adapters(params, [StackEntry(config, targets)], [trained])
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(always)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(outside), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_base_adapts_in_float32(tiny_dit):
    model, params, _, _ = tiny_dit
    config = AdapterConfig("lora", rank=2)
    targets = find_targets({"model": model}, config)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    weights = trained_like(init_adapter(jax.random.key(0), config, targets, half))
    adapted = apply_adapters(half, [StackEntry(config, targets)], [weights])
    kernel = adapted["model"]["transformer"]["layers"][0]["self_attn"]["to_qkv"]["kernel"][...]
    assert kernel.dtype == jnp.float32
    assert merge_adapters(half, [StackEntry(config, targets)], [weights])["model"]["transformer"]["project_in"][
        "kernel"][...].dtype == jnp.bfloat16


def test_file_round_trip_and_mismatch_errors(tiny_dit, tmp_path):
    model, params, _, _ = tiny_dit
    config = AdapterConfig("dora", rank=3, include=("model/transformer/*",), exclude=("*/ff/*",))
    targets = find_targets({"model": model}, config)
    assert all("/ff/" not in name for name in targets) and len(targets) == 2 * 5 + 2  # 5 attention Dense a block, project_in/out
    weights = trained_like(init_adapter(jax.random.key(0), config, targets, params))
    path = save_adapter(tmp_path / "a.safetensors", config, weights)
    trained, stored = parameter_count(weights)
    assert trained == stored == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(weights))
    entry_, loaded = load_adapter(path, {"model": model}, strength=0.5)
    assert entry_.config == config and entry_.strength == 0.5 and set(entry_.targets) == set(targets)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(weights)):
        np.testing.assert_array_equal(a, b)

    other = registry.build(load_config(str(REPO / "configs" / "diffusion.py") + ":tiny",
                                       ["model.embed_dim=32", "model.num_heads=2"]).model, nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"tensor model/transformer/layers/0/cross_attn/to_out/lora_a has shape \(3, 64\)"):
        load_adapter(path, {"model": other})
    renamed = {"model": {"transformer": {"layers": {"7": weights["model"]["transformer"]["layers"]["0"]}}}}
    save_adapter(tmp_path / "b.safetensors", config, renamed)
    with pytest.raises(ConfigError, match="adapts layer model/transformer/layers/7/cross_attn/to_kv"):
        load_adapter(tmp_path / "b.safetensors", {"model": model})
    with pytest.raises(ConfigError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors", {"model": model})


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="kind='lorax'"):
        AdapterConfig("lorax")
    with pytest.raises(ConfigError, match="config.lora.ranks"):
        AdapterConfig.from_mapping({"ranks": 4})
    toy, _ = toy_params()
    with pytest.raises(ConfigError, match="selects no Dense"):
        find_targets({"toy": toy}, AdapterConfig(include=("nothing/*",)))
    assert parse_adapter_specs("a.safetensors:0.5,b.safetensors") == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    assert parse_adapter_specs(["c:/x.safetensors"]) == [("c:/x.safetensors", 1.0)]


def test_layer_tensors_groups_by_layer():
    tree = {"model": {"a": {"lora_a": 1, "lora_b": 2}, "b": {"c": {"xs_m": 3}}}}
    assert layer_tensors(tree) == {"model/a": {"lora_a": 1, "lora_b": 2}, "model/b/c": {"xs_m": 3}}

"""How the 1.06 B-parameter SAO DiT lands on a mesh, checked abstractly (nnx.eval_shape: no parameter memory)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from musicdiff.config import DEFAULT_SHARDING_RULES, load_config, mesh_config
from musicdiff.describe import abstract_params
from musicdiff.models import registry
from musicdiff.parallel import make_mesh, param_shardings, per_device_bytes
from musicdiff.models.denoiser import ConditioningInputs
from musicdiff.errors import ShardingContextError
from musicdiff.parallel.sharding import current_layout, sharding_context, unsharded as unsharded_context


@pytest.fixture(scope="module")
def sao_params():
    return abstract_params(load_config("configs/diffusion.py:sao").model)


def flat(tree):
    return {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(tree)}


def test_fsdp8_shards_nearly_all_bytes(devices, sao_params):
    mesh = make_mesh(mesh_config(data=1, fsdp=8))
    shardings = flat(param_shardings(sao_params, DEFAULT_SHARDING_RULES, mesh))
    params = flat(sao_params)
    nbytes = {name: math.prod(p.shape) * np.dtype(p.dtype).itemsize for name, p in params.items()}
    total = sum(nbytes.values())
    sharded = sum(nbytes[name] for name, s in shardings.items() if any(axis is not None for axis in s.spec))
    assert total == 4 * 1_056_828_544  # fp32 parameters
    assert sharded / total >= 0.99
    per_device = per_device_bytes(sao_params, param_shardings(sao_params, DEFAULT_SHARDING_RULES, mesh))
    assert abs(per_device - total / 8) <= 0.01 * total / 8


# One block of the SAO DiT: E=1536, 24 heads x 64, context 768 wide (12 kv heads), SwiGLU inner 6144.
BLOCK_GOLDEN = {
    # data=2 x fsdp=4: every kernel split 4 ways on its model-width ("embed") dimension, norms replicated.
    (2, 4, 1, 1): {
        "pre_norm.scale": P(),
        "self_attn.to_qkv.kernel": P("fsdp"),  # [1536, 3, 24, 64]
        "self_attn.to_out.kernel": P(None, None, "fsdp"),  # [24, 64, 1536]
        "cross_attend_norm.scale": P(),
        "cross_attn.to_q.kernel": P("fsdp"),  # [1536, 24, 64]
        "cross_attn.to_kv.kernel": P("fsdp"),  # [768, 2, 12, 64]
        "cross_attn.to_out.kernel": P(None, None, "fsdp"),
        "ff_norm.scale": P(),
        "ff.proj.kernel": P("fsdp"),  # [1536, 2, 6144]
        "ff.proj.bias": P(),  # [2, 6144]
        "ff.out.kernel": P(None, "fsdp"),  # [6144, 1536]
        "ff.out.bias": P("fsdp"),  # [1536]
    },
    # fsdp=2 x tensor=4: Megatron-style heads / SwiGLU-inner split on tensor, the model width on fsdp.
    (1, 2, 4, 1): {
        "pre_norm.scale": P(),
        "self_attn.to_qkv.kernel": P("fsdp", None, "tensor"),
        "self_attn.to_out.kernel": P("tensor", None, "fsdp"),
        "cross_attend_norm.scale": P(),
        "cross_attn.to_q.kernel": P("fsdp", "tensor"),
        "cross_attn.to_kv.kernel": P("fsdp", None, "tensor"),
        "cross_attn.to_out.kernel": P("tensor", None, "fsdp"),
        "ff_norm.scale": P(),
        "ff.proj.kernel": P("fsdp", None, "tensor"),
        "ff.proj.bias": P(None, "tensor"),
        "ff.out.kernel": P("tensor", "fsdp"),
        "ff.out.bias": P("fsdp"),
    },
}


@pytest.mark.parametrize("shape", list(BLOCK_GOLDEN))
def test_block_partition_specs(devices, sao_params, shape):
    mesh = make_mesh(mesh_config(*shape))
    shardings = param_shardings(sao_params, DEFAULT_SHARDING_RULES, mesh)
    for index in (0, 23):
        got = {name: sharding.spec for name, sharding in flat(shardings["transformer"]["layers"][index]).items()}
        assert got == BLOCK_GOLDEN[shape]


def test_sharded_forward_matches_single_device(devices, unsharded):
    """The tiny DiT under data x fsdp x tensor with its activation constraints gives the unsharded result."""
    config = load_config("configs/diffusion.py:tiny")
    mesh = make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
    model = registry.build(config.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    # Live branches: perturb the zero-initialised outputs too.
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    x = jnp.asarray(rng.normal(size=(4, 64, 16)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=4), jnp.float32)
    cross = jnp.asarray(rng.normal(size=(4, 8, 32)), jnp.float32)
    mask = jnp.asarray(np.arange(8)[None] < np.array([[3], [8], [5], [1]]))
    glob = jnp.asarray(rng.normal(size=(4, int(config.model.global_cond_dim))), jnp.float32)

    def apply(params, x, t, cross, mask, glob):
        return nnx.merge(graphdef, params)(x, t, ConditioningInputs(cross, mask, glob))

    expected = jax.jit(apply)(params, x, t, cross, mask, glob)
    shardings = param_shardings(params, DEFAULT_SHARDING_RULES, mesh)
    sharded = jax.device_put(params, shardings)
    assert sharded["transformer"]["layers"][0]["ff"]["proj"]["kernel"][...].sharding.spec == P("fsdp", None, "tensor")
    with sharding_context(mesh, DEFAULT_SHARDING_RULES):
        out = jax.jit(apply)(sharded, x, t, cross, mask, glob)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # A CFG batch with the null half implicit (2 context rows for 4 samples): on a batch-split mesh the DiT pads the
    # context with the null rows instead of skipping them, and gives the explicit zero-token result.
    explicit_null = jnp.concatenate([cross[:2], jnp.zeros_like(cross[:2])])
    expected_cfg = jax.jit(apply)(params, x, t, explicit_null, mask, glob)
    with sharding_context(mesh, DEFAULT_SHARDING_RULES):
        out_cfg = jax.jit(apply)(sharded, x, t, cross[:2], mask[:2], glob)
    np.testing.assert_allclose(out_cfg, expected_cfg, rtol=1e-4, atol=1e-5)


def test_tracing_outside_a_sharding_context_fails_loudly(devices):
    """A step lowered with no layout declared raises instead of compiling without its activation constraints."""
    config = load_config("configs/diffusion.py:tiny")
    graphdef, params = nnx.split(registry.build(config.model, nnx.Rngs(0)), nnx.Param)
    x, t = jnp.zeros((2, 64, 16)), jnp.zeros((2,))
    cond = ConditioningInputs(jnp.zeros((2, 8, 32)), jnp.ones((2, 8), bool),
                              jnp.zeros((2, int(config.model.global_cond_dim))))

    def apply(params, x):
        return nnx.merge(graphdef, params)(x, t, cond)

    with pytest.raises(ShardingContextError, match="outside a sharding context"):
        jax.jit(apply).lower(params, x)
    with pytest.raises(ShardingContextError):
        current_layout()
    mesh = make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
    with sharding_context(mesh, DEFAULT_SHARDING_RULES):
        assert current_layout()[0] is mesh
        lowered = jax.jit(apply).lower(params, x).as_text()
    assert "sharding_constraint" in lowered or "mhlo.sharding" in lowered
    with unsharded_context():
        assert current_layout() is None
        assert "sharding_constraint" not in jax.jit(apply).lower(params, jnp.ones((2, 64, 16))).as_text()


def test_sa3_tiny_sharded_forward_matches_single_device(devices, unsharded):
    """Stable Audio 3's options (sa3_adaln blocks, RMS norms, differential attention, memory tokens, the local input
    and a padding mask) keep their logical axes: data x fsdp x tensor gives the unsharded result."""
    config = load_config("configs/diffusion.py:sa3_tiny", ["model.differential_attention=True"])
    mesh = make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
    model = registry.build(config.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    channels, width = int(config.model.io_channels), int(config.model.cond_token_dim)
    x = jnp.asarray(rng.normal(size=(4, channels, 16)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=4), jnp.float32)
    cross = jnp.asarray(rng.normal(size=(4, 9, width)), jnp.float32)
    mask = jnp.ones((4, 9), bool)
    glob = jnp.asarray(rng.normal(size=(4, width)), jnp.float32)
    local = jnp.asarray(rng.normal(size=(4, channels + 1, 16)), jnp.float32)
    padding = jnp.asarray(np.arange(16)[None] < np.array([[16], [9], [12], [5]]))

    def apply(params, x, t, cross, mask, glob, local, padding):
        return nnx.merge(graphdef, params)(x, t, ConditioningInputs(cross, mask, glob), local_cond=local,
                                           padding_mask=padding)

    args = (x, t, cross, mask, glob, local, padding)
    expected = jax.jit(apply)(params, *args)
    sharded = jax.device_put(params, param_shardings(params, DEFAULT_SHARDING_RULES, mesh))
    assert sharded["transformer"]["layers"][0]["self_attn"]["to_qkv"]["kernel"][...].sharding.spec == P(
        "fsdp", None, "tensor")
    with sharding_context(mesh, DEFAULT_SHARDING_RULES):
        out = jax.jit(apply)(sharded, *args)
    # Outputs reach ~20 with these weights: float32 reassociation under sharding is ~4e-6 of that.
    assert float(jnp.max(jnp.abs(out - expected))) <= 1e-5 * float(jnp.max(jnp.abs(expected)))

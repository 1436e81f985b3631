"""Mesh construction and logical-axis sharding: golden PartitionSpecs under several mesh layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from musicdiff.parallel import DEFAULT_SHARDING_RULES, mesh_config
from musicdiff.errors import ConfigError
from musicdiff.parallel import make_mesh, mesh_shape_from_config, param_shardings, per_device_bytes, shard_batch
from musicdiff.parallel.sharding import constrain, logical_to_mesh_spec, sharding_context


class SampleBlock(nnx.Module):
    """A parameter tree shaped like the real models': dense, attention, conv, embedding and norm weights."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.up = nnx.Param(init(rngs.params(), (64, 256)), out_sharding=("embed", "mlp"))
        self.down = nnx.Param(init(rngs.params(), (256, 64)), out_sharding=("mlp", "embed"))
        self.qkv = nnx.Param(init(rngs.params(), (64, 8, 16)), out_sharding=("embed", "heads", "kv"))
        self.conv = nnx.Param(init(rngs.params(), (7, 16, 32)), out_sharding=("kernel", "conv_in", "conv_out"))
        self.odd_conv = nnx.Param(init(rngs.params(), (7, 16, 30)), out_sharding=("kernel", "conv_in", "conv_out"))
        self.vocab = nnx.Param(init(rngs.params(), (128, 64)), out_sharding=("vocab", "embed"))
        self.scale = nnx.Param(jnp.ones((64,)), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((64,)))  # no names: replicated


GOLDEN = {
    # data parallel only: every parameter replicated.
    (8, 1, 1, 1): dict(up=P(), down=P(), qkv=P(), conv=P(), odd_conv=P(), vocab=P(), scale=P(), bias=P()),
    # data x fsdp: the embed / conv_out dimension is split 4 ways; 30 output channels do not divide by 4.
    (2, 4, 1, 1): dict(up=P("fsdp"), down=P(None, "fsdp"), qkv=P("fsdp"), conv=P(None, None, "fsdp"),
                       odd_conv=P(), vocab=P(None, "fsdp"), scale=P(), bias=P()),
    # fsdp x tensor: megatron-style mlp/heads/vocab split plus fsdp on embed.
    (1, 2, 4, 1): dict(up=P("fsdp", "tensor"), down=P("tensor", "fsdp"), qkv=P("fsdp", "tensor"),
                       conv=P(None, None, "fsdp"), odd_conv=P(None, None, "fsdp"), vocab=P("tensor", "fsdp"),
                       scale=P(), bias=P()),
    # everything at once: sequence does not touch parameters.
    (1, 2, 2, 2): dict(up=P("fsdp", "tensor"), down=P("tensor", "fsdp"), qkv=P("fsdp", "tensor"),
                       conv=P(None, None, "fsdp"), odd_conv=P(None, None, "fsdp"), vocab=P("tensor", "fsdp"),
                       scale=P(), bias=P()),
}


@pytest.mark.parametrize("shape", list(GOLDEN))
def test_golden_partition_specs(devices, shape):
    mesh = make_mesh(mesh_config(*shape))
    assert tuple(mesh.shape.values()) == shape
    abstract = nnx.state(nnx.eval_shape(lambda: SampleBlock(nnx.Rngs(0))), nnx.Param)
    shardings = param_shardings(abstract, DEFAULT_SHARDING_RULES, mesh)
    got = {name: var.get_value().spec for name, var in shardings.items()}
    assert got == GOLDEN[shape]


def test_per_device_bytes_counts_shards(devices):
    mesh = make_mesh(mesh_config(1, 2, 4, 1))
    abstract = nnx.state(nnx.eval_shape(lambda: SampleBlock(nnx.Rngs(0))), nnx.Param)
    shardings = param_shardings(abstract, DEFAULT_SHARDING_RULES, mesh)
    # up, down, qkv, vocab split 8 ways; conv, odd_conv split 2 ways; scale and bias replicated.
    expected = 4 * (64 * 256 * 2 // 8 + 64 * 8 * 16 // 8 + 128 * 64 // 8 + (7 * 16 * 32 + 7 * 16 * 30) // 2 + 128)
    assert per_device_bytes(abstract, shardings) == expected


def test_sharded_init_places_params(devices):
    mesh = make_mesh(mesh_config(2, 4, 1, 1))
    abstract = nnx.state(nnx.eval_shape(lambda: SampleBlock(nnx.Rngs(0))), nnx.Param)
    shardings = param_shardings(abstract, DEFAULT_SHARDING_RULES, mesh)

    @jax.jit
    def init():
        return nnx.state(SampleBlock(nnx.Rngs(0)), nnx.Param)

    params = jax.jit(init, out_shardings=shardings)()
    assert params["up"][...].sharding.spec == P("fsdp")
    assert params["up"][...].addressable_shards[0].data.shape == (16, 256)
    reference = nnx.state(SampleBlock(nnx.Rngs(0)), nnx.Param)
    # jit and eager may round the normal sampler differently in the last ulp
    np.testing.assert_allclose(np.asarray(params["up"][...]), np.asarray(reference["up"][...]), rtol=1e-6, atol=1e-7)


def test_mesh_fill_and_errors():
    assert mesh_shape_from_config(dict(data=-1, fsdp=2, tensor=1, sequence=1), 8)["data"] == 4
    assert mesh_shape_from_config(dict(data=1, fsdp=-1, tensor=2, sequence=1), 8)["fsdp"] == 4
    with pytest.raises(ConfigError, match=r"config\.mesh: .*3 devices but 8"):
        mesh_shape_from_config(dict(data=3, fsdp=1, tensor=1, sequence=1), 8)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        mesh_shape_from_config(dict(data=-1, fsdp=-1), 8)
    with pytest.raises(ConfigError, match="does not divide"):
        mesh_shape_from_config(dict(data=-1, fsdp=3), 8)
    with pytest.raises(ConfigError, match=r"config\.mesh\.model: unknown mesh axis"):
        mesh_shape_from_config(dict(model=2), 8)


def test_unknown_logical_axis_is_a_config_error(devices):
    mesh = make_mesh(mesh_config())
    with pytest.raises(ConfigError, match="logical axis 'nonsense' has no rule"):
        logical_to_mesh_spec(("nonsense",), (8,), DEFAULT_SHARDING_RULES, mesh)


def test_shard_batch_and_activation_constraint(devices):
    mesh = make_mesh(mesh_config(2, 2, 1, 2))
    batch = shard_batch({"x": np.arange(8 * 6, dtype=np.float32).reshape(8, 6)}, mesh, DEFAULT_SHARDING_RULES)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(48, dtype=np.float32).reshape(8, 6))

    @jax.jit
    def f(x):
        return constrain(x * 2, ("activation_batch", "activation_length"))

    with sharding_context(mesh, DEFAULT_SHARDING_RULES):
        out = f(batch["x"])
    assert out.sharding.spec == P(("data", "fsdp"), "sequence")

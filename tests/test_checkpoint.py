"""Checkpointer: bit-exact sharded round trips, resharding, keep-N, clear errors, Grain position, async saves."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from musicdiff.parallel import DEFAULT_SHARDING_RULES, mesh_config
from musicdiff.parallel import make_mesh, param_shardings
from musicdiff.checkpoints import CheckpointError, Checkpointer, abstract_target, restore_params_only


class TinyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 64):
        init = nnx.initializers.normal(0.02)
        self.up = nnx.Param(init(rngs.params(), (width, 128)), out_sharding=("embed", "mlp"))
        self.conv = nnx.Param(init(rngs.params(), (3, 16, 32)), out_sharding=("kernel", "conv_in", "conv_out"))
        self.scale = nnx.Param(jnp.ones((width,)), out_sharding=("norm",))


def make_state(mesh, seed=0, width=64):
    abstract = nnx.state(nnx.eval_shape(lambda: TinyModel(nnx.Rngs(seed), width)), nnx.Param)
    shardings = param_shardings(abstract, DEFAULT_SHARDING_RULES, mesh)
    params = jax.jit(lambda: nnx.state(TinyModel(nnx.Rngs(seed), width), nnx.Param), out_shardings=shardings)()
    tx = optax.adamw(1e-3)
    opt_state = jax.jit(tx.init)(params)
    # One update so the optimiser moments are non-trivial.
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0), params)
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    params = jax.jit(optax.apply_updates)(params, updates)
    ema = jax.tree.map(lambda p: p * 0.5, params)
    return dict(params=params, opt_state=opt_state, ema=ema, step=jnp.asarray(10, jnp.int32),
                rng=jax.random.key(seed + 1))


def on_mesh(state, mesh):
    """The abstract target of `state` with every NamedSharding moved to `mesh` (same specs)."""
    def one(x):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(mesh, sharding.spec)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, state)


def assert_bit_identical(restored, original):
    flat_r, tree_r = jax.tree_util.tree_flatten(restored)
    flat_o, tree_o = jax.tree_util.tree_flatten(original)
    assert tree_r == tree_o
    for r, o in zip(flat_r, flat_o):
        if jax.dtypes.issubdtype(o.dtype, jax.dtypes.prng_key):
            r, o = jax.random.key_data(r), jax.random.key_data(o)
        assert r.dtype == o.dtype and r.shape == o.shape
        np.testing.assert_array_equal(np.asarray(r), np.asarray(o))


@pytest.fixture(scope="module")
def mesh(devices):
    return make_mesh(mesh_config(2, 4, 1, 1))


def test_round_trip_is_bit_identical_into_sharded_target(tmp_path, mesh):
    state = make_state(mesh)
    assert state["params"]["up"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    config = ml_collections.ConfigDict(dict(lr=1e-3, model=dict(name="tiny", sizes=(1, 2))))
    with Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
        assert ckpt.save(10, state, config=config)
    target = abstract_target(state)
    with Checkpointer(tmp_path) as ckpt:  # a fresh manager, as after a restart
        assert ckpt.latest_step() == 10
        restored = ckpt.restore(target)
    assert restored.step == 10 and restored.config == dict(lr=1e-3, model=dict(name="tiny", sizes=[1, 2]))
    assert_bit_identical(restored.state, state)
    got_up = restored.state["params"]["up"][...]
    assert got_up.sharding == state["params"]["up"][...].sharding
    assert got_up.addressable_shards[0].data.shape == (16, 128)
    assert isinstance(restored.state["params"], nnx.State)
    assert restored.state["opt_state"][0].mu["up"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp")


def test_restore_onto_a_different_mesh_layout(tmp_path, mesh):
    state = make_state(mesh, seed=3)
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(1, state)
        other = make_mesh(mesh_config(1, 2, 4, 1))
        restored = ckpt.restore(on_mesh(state, other)).state
    up = restored["params"]["up"][...]
    assert up.sharding.mesh.shape == other.shape and up.addressable_shards[0].data.shape == (32, 128)
    assert_bit_identical(restored, state)


def test_keep_n_and_keep_period(tmp_path, mesh):
    state = dict(w=jnp.arange(8.0))
    with Checkpointer(tmp_path / "n", max_to_keep=2, save_interval_steps=1) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "n").iterdir() if p.name.isdigit()) == ["3", "4"]
    with Checkpointer(tmp_path / "p", max_to_keep=2, save_interval_steps=1, keep_period=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 4, 5]


def test_interval_and_forced_saves(tmp_path):
    state = dict(w=jnp.ones(4))
    with Checkpointer(tmp_path, save_interval_steps=100) as ckpt:
        assert not ckpt.save(7, state)  # not a multiple of the interval
        assert ckpt.save(7, state, force=True)  # e.g. the loop's save before a preemption exit
        ckpt.wait_until_finished()
        assert not ckpt.save(7, state, force=True)  # a saved step is never rewritten
        assert ckpt.save(200, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [7, 200]


def test_incompatible_restores_raise_clearly(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(abstract_target(state))
    with Checkpointer(tmp_path / "c", save_interval_steps=1) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        wider = make_state(mesh, width=32)
        with pytest.raises(CheckpointError, match=r"params/up: checkpoint has \(64, 128\) float32, target wants "
                                                  r"\(32, 128\) float32"):
            ckpt.restore(abstract_target(wider))
        missing = dict(state, extra=jnp.zeros(3))
        with pytest.raises(CheckpointError, match="missing in checkpoint: extra"):
            ckpt.restore(abstract_target(missing))
        fewer = {k: v for k, v in state.items() if k != "ema"}
        with pytest.raises(CheckpointError, match="not in target: ema/up"):
            ckpt.restore(abstract_target(fewer))
        half = dict(state, step=jnp.asarray(10, jnp.int16))
        with pytest.raises(CheckpointError, match="step: checkpoint has \\(\\) int32, target wants \\(\\) int16"):
            ckpt.restore(abstract_target(half))
        with pytest.raises(CheckpointError, match=r"step 5 is not in .*saved steps: \[1\]"):
            ckpt.restore(abstract_target(state), step=5)
        with pytest.raises(CheckpointError, match="saved without data_iter"):
            ckpt.restore(abstract_target(state), data_iter=iter(grain.MapDataset.range(4).to_iter_dataset()))


def test_grain_iterator_position_round_trip(tmp_path):
    dataset = grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset()
    iterator = iter(dataset)
    consumed = [next(iterator) for _ in range(7)]
    state = dict(w=jnp.ones(2))
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(7, state, data_iter=iterator)
        expected = [next(iterator) for _ in range(5)]  # the saved position is taken at save time
        ckpt.wait_until_finished()
    assert (tmp_path / "7" / "data_iter" / "process_0-of-1.json").is_file()
    fresh = iter(dataset)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.restore(abstract_target(state), data_iter=fresh)
    assert [next(fresh) for _ in range(5)] == expected
    assert sorted(consumed + expected + [next(fresh) for _ in range(88)]) == list(range(100))


def test_async_save_survives_donated_buffers(tmp_path, mesh):
    state = make_state(mesh, seed=5)
    host_copy = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), state)
    target = abstract_target(state)
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=True) as ckpt:
        assert ckpt.save(3, state)
        # What a donating train step does to its input: the device buffers are gone before the write ends.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3]
        restored = ckpt.restore(target).state
    got = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), restored)
    jax.tree.map(np.testing.assert_array_equal, got, host_copy)
    assert not any(p.name.endswith("tmp") or "tmp-" in p.name for p in tmp_path.iterdir())


def test_restore_params_only_for_fine_tuning(tmp_path, mesh):
    state = make_state(mesh, seed=7)
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(4, state)
        ckpt.save(8, dict(state, params=jax.tree.map(lambda p: p + 1.0, state["params"])))
    abstract = abstract_target(state["params"])
    latest = restore_params_only(tmp_path, abstract)
    assert_bit_identical(latest, jax.tree.map(lambda p: p + 1.0, state["params"]))
    earlier = restore_params_only(tmp_path / "4", abstract)
    assert_bit_identical(earlier, state["params"])
    assert earlier["up"][...].sharding == state["params"]["up"][...].sharding
    ema = restore_params_only(tmp_path, abstract, subtree="ema", step=4)
    assert_bit_identical(ema, state["ema"])
    as_bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=s.sharding), abstract)
    cast = restore_params_only(tmp_path, as_bf16, step=4)
    assert cast["up"][...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cast["up"][...]),
                                  np.asarray(state["params"]["up"][...].astype(jnp.bfloat16)))
    with pytest.raises(CheckpointError, match=r"params/up: checkpoint has \(64, 128\)"):
        restore_params_only(tmp_path, abstract_target(make_state(mesh, width=32)["params"]))
    with pytest.raises(CheckpointError, match="no 'teacher/' subtree"):
        restore_params_only(tmp_path, abstract, subtree="teacher")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        restore_params_only(tmp_path / "nowhere", abstract)

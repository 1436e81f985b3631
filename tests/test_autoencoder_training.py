"""Autoencoder train steps: the alternation schedule, which parameters each kind of step updates, the sharded step
against the 1-device step, and the NaN guard. A 2-block Oobleck and a one-scale discriminator keep compiles short."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicdiff.parallel import mesh_config
from musicdiff.parallel import make_mesh
from musicdiff.training import loop
from musicdiff.training.autoencoder import (DISCRIMINATOR, GENERATOR, GENERATOR_WARMUP, AutoencoderTrainer,
                                            generator_updates_before, reachable_kinds, step_kind)
from musicdiff.metrics import MetricLogger, NanGuard, NonFiniteLossError
from tests.autoencoder_fixtures import small_config

STEPS = 4
# One step on 8 devices (data=2, fsdp=4) against the same step on 1 device, from the same state. Measured: losses
# agree to 2.6e-7 relative, parameters to 4.3e-6 absolute (an update is ~1e-3: Adam at lr 1e-3), the gradient norm
# to 5.3e-5 relative and Adam's moments to 2.1e-4 of each leaf's largest moment, these two on the adversarial
# generator step (the hinge, the L1 feature matching and the leaky ReLUs have kinks where float noise from another
# summation order picks the other side). The tolerances leave a margin of 4.6x or more. Adam with eps 1e-8 would move every weight whose gradient exceeds 1e-8 by a
# whole ±lr on its first update, so noise on a near-zero gradient would flip whole updates; eps 1e-3 makes each
# update a smooth function of its gradient, so the comparison checks the sharded gradients themselves.
ADAM_EPS = 1e-3
LOSS_RTOL = 2e-5
PARAM_ATOL = 2e-5
MOMENT_RTOL = 2e-3
GRAD_NORM_RTOL = 3e-4


# ---------------------------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("mode", ["adv", "full"])
@pytest.mark.parametrize("warmup", [0, 1, 4, 5])
def test_step_kinds_follow_the_reference_schedule(mode, warmup):
    for step in range(12):
        odd = step % 2 == 1
        # The reference: discriminator when global_step is odd and (mode "adv" or warmed up); else generator.
        discriminator = odd and (mode == "adv" or step >= warmup)
        expected = DISCRIMINATOR if discriminator else GENERATOR if step >= warmup else GENERATOR_WARMUP
        assert step_kind(step, warmup, mode) == expected
        counted = sum(step_kind(s, warmup, mode) != DISCRIMINATOR for s in range(step))
        assert int(generator_updates_before(step, warmup, mode)) == counted
    for num_steps in range(1, 9):
        assert set(reachable_kinds(num_steps, warmup, mode)) == {step_kind(s, warmup, mode)
                                                                 for s in range(num_steps)}
    assert len(reachable_kinds(0, warmup, mode)) == 1  # a step function exists even when no step runs


# ---------------------------------------------------------------------------------------------- 1-device run


def step_programs(trainer, shardings, batch_shardings, mesh, rules, start_step):
    """What the runner compiles for the trainer: one program per reachable kind of step."""
    return loop.StepPrograms(trainer.step_kinds(), trainer.step, trainer.step_kind, shardings, batch_shardings, mesh,
                             rules, start_step)


def make_batches(count):
    """Stereo tones with noise (what an autoencoder sees), one batch per step."""
    t = np.arange(2048) / 44100.0
    rng = np.random.default_rng(0)
    batches = []
    for step in range(count):
        freqs = rng.uniform(100, 4000, size=(8, 2, 1))
        audio = 0.3 * np.sin(2 * np.pi * freqs * t) + 0.02 * rng.standard_normal((8, 2, 2048))
        batches.append({"audio": audio.astype(np.float32)})
    return batches


def host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype,
                                                                                         jax.dtypes.prng_key) else x),
                        tree)


def changed(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.fixture(scope="module")
def one_device_run(devices):
    """Steps 0..3 on one device with warm-up 1 (mode "adv"): warm-up generator, discriminator, generator,
    discriminator. Keeps host copies of every state, the metrics, and device copies of the states before steps 1..3
    (taken before the step donates them)."""
    config = small_config("training.warmup_steps=1", f"training.num_steps={STEPS + 2}", "training.lr_warmup=0.0",
                          "training.generator.learning_rate=1e-3", "training.discriminator.learning_rate=1e-3",
                          f"training.generator.eps={ADAM_EPS}", f"training.discriminator.eps={ADAM_EPS}", "mesh.data=1")
    trainer = AutoencoderTrainer(config)
    mesh = make_mesh(mesh_config(data=1), devices[:1])
    rules = config.sharding_rules
    state, shardings = loop.init_state(trainer.init_state, mesh, rules, jax.random.key(0))
    batches = make_batches(STEPS)
    step_fn = step_programs(trainer, shardings, loop.batch_shardings(batches[0], mesh, rules), mesh, rules, 0)
    states, metrics, inputs = [host(state)], [], {}
    for step, batch in enumerate(batches):
        if step:
            inputs[step] = jax.device_put(state, shardings, may_alias=False)
        state, step_metrics = step_fn(state, loop.shard_batch(batch, mesh, rules))
        states.append(host(state))
        metrics.append(jax.device_get(step_metrics))
    return dict(config=config, trainer=trainer, states=states, metrics=metrics, inputs=inputs, state=state,
                step_fn=step_fn, mesh=mesh, batches=batches)


def test_each_kind_updates_its_own_parameters(one_device_run):
    states, metrics = one_device_run["states"], one_device_run["metrics"]
    expected = [GENERATOR_WARMUP, DISCRIMINATOR, GENERATOR, DISCRIMINATOR]
    for step, kind in enumerate(expected):
        before, after, m = states[step], states[step + 1], metrics[step]
        generator_step = kind != DISCRIMINATOR
        assert changed(before["params"]["autoencoder"], after["params"]["autoencoder"]) == generator_step
        assert changed(before["opt_state"]["generator"], after["opt_state"]["generator"]) == generator_step
        assert changed(before["ema"]["autoencoder"], after["ema"]["autoencoder"]) == generator_step
        assert changed(before["params"]["discriminator"], after["params"]["discriminator"]) != generator_step
        assert changed(before["opt_state"]["discriminator"], after["opt_state"]["discriminator"]) != generator_step
        assert int(after["step"]) == step + 1 and np.array_equal(before["rng"], after["rng"])
        assert m["discriminator_step"] == float(kind == DISCRIMINATOR)
        assert m["adversarial_on"] == float(step >= 1) and m["update_skipped"] == 0.0
    # Warm-up: no discriminator pass at all, so no adversarial terms in the loss; afterwards they are in it.
    first = metrics[0]
    assert first["adversarial"] == first["feature_matching"] == first["discriminator_loss"] == 0.0
    assert first["loss"] == pytest.approx(first["spectral"] + 1e-4 * first["kl"], rel=1e-6)
    third = metrics[2]
    assert third["feature_matching"] > 0.0 and third["discriminator_loss"] > 0.0
    assert third["loss"] == pytest.approx(third["spectral"] + 1e-4 * third["kl"] + 0.1 * third["adversarial"]
                                          + 5.0 * third["feature_matching"], rel=1e-5)
    # ema_pytorch with update_after_step=1 copies the weights on its first two updates (decays from the third).
    assert metrics[0]["ema_decay"] == metrics[2]["ema_decay"] == 0.0
    for step in (1, 3):
        for a, b in zip(jax.tree.leaves(states[step]["ema"]),
                        jax.tree.leaves(states[step]["params"]["autoencoder"])):
            np.testing.assert_array_equal(a, b)
    # Each optimiser's schedule is read at its own update count (InverseLR with warmup 0: lr · (1 + n/γ)^-0.5).
    assert metrics[2]["generator_lr"] == pytest.approx(1e-3 * (1 + 1 / 200000.0) ** -0.5, rel=1e-6)
    assert metrics[3]["discriminator_lr"] == pytest.approx(1e-3 * (1 + 1 / 200000.0) ** -0.5, rel=1e-6)


def test_sharded_step_matches_one_device(one_device_run, devices, measurement):
    """Steps 1..3 (discriminator, generator, discriminator) on data=2 x fsdp=4, each from the 1-device run's state."""
    run = one_device_run
    trainer, rules = run["trainer"], run["config"].sharding_rules
    mesh = make_mesh(mesh_config(data=2, fsdp=4), devices)
    _, shardings = loop.state_shardings(trainer.init_state, mesh, rules, jax.random.key(0))
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    step_fn = step_programs(trainer, shardings, loop.batch_shardings(run["batches"][0], mesh, rules), mesh, rules, 1)
    worst = dict(loss=0.0, grad_norm=0.0, param=0.0, moment=0.0)
    for step in range(1, STEPS):
        step_fn.next_step = step
        state = jax.device_put(run["inputs"][step], shardings, may_alias=False)
        state, metrics = step_fn(state, loop.shard_batch(run["batches"][step], mesh, rules))
        metrics = jax.device_get(metrics)
        for name, value in run["metrics"][step].items():
            kind = "grad_norm" if name == "grad_norm" else "loss"
            np.testing.assert_allclose(metrics[name], value, rtol=GRAD_NORM_RTOL if kind == "grad_norm" else LOSS_RTOL,
                                       atol=1e-7, err_msg=name)
            worst[kind] = max(worst[kind], abs(metrics[name] - value) / max(abs(value), 1e-7))
        got, want = host(state), run["states"][step + 1]
        for section in ("params", "ema", "step", "rng"):
            for a, b in zip(jax.tree.leaves(got[section]), jax.tree.leaves(want[section])):
                np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL, err_msg=section)
                worst["param"] = max(worst["param"], float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0)))
        for a, b in zip(jax.tree.leaves(got["opt_state"]), jax.tree.leaves(want["opt_state"])):
            # Relative to the leaf's largest moment: the kinks add noise of one size to every element.
            error = float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0))
            scale = float(np.max(np.abs(b.astype(np.float64)), initial=0.0))
            assert error <= MOMENT_RTOL * scale + 1e-12, (error, scale)
            worst["moment"] = max(worst["moment"], error / scale if scale else 0.0)
    update = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(run["states"][3]["params"]),
                                                               jax.tree.leaves(run["states"][2]["params"])))
    assert update >= 10 * PARAM_ATOL  # the steps really move the weights, well beyond the tolerance
    for name, value in worst.items():
        measurement(f"max {name} difference, 8 devices vs 1 ({'absolute' if name == 'param' else 'relative'})",
                    value)


def test_nan_batch_is_skipped_and_the_guard_stops_after_k(one_device_run, tmp_path):
    run = one_device_run
    state, step_fn, mesh, rules = run["state"], run["step_fn"], run["mesh"], run["config"].sharding_rules
    poisoned = {"audio": run["batches"][0]["audio"].copy()}
    poisoned["audio"][3, 1, 100] = np.nan
    before = host(state)
    logger = MetricLogger(tmp_path, nan_guard=NanGuard(2, keys=AutoencoderTrainer.guarded_metrics), progress=False, tensorboard=False)
    with pytest.raises(NonFiniteLossError, match="2 consecutive"):
        with logger:
            for step in (STEPS, STEPS + 1):  # a generator step, then a discriminator step
                state, metrics = step_fn(state, loop.shard_batch(poisoned, mesh, rules))
                values = jax.device_get(metrics)
                assert values["update_skipped"] == 1.0 and math.isnan(values["loss"])
                after = host(state)
                for section in ("params", "ema", "opt_state"):
                    assert not changed(before[section], after[section]), section
                assert int(after["step"]) == step + 1
                logger.push(step + 1, metrics)
            logger.flush()


def test_the_mel_term_is_the_reconstruction_metrics_mel_distance():
    """loss_weights.mel adds the mel-scaled MR-STFT; at the metric's one resolution it is audio/metrics.mel_distance
    (an independent NumPy implementation), with the real audio in the spectral-convergence denominator."""
    from musicdiff.audio.metrics import mel_distance

    config = small_config("training.loss_weights.mel=2.0", "training.loss_weights.l1=3.0",
                          "training.mel_fft_sizes=(1024,)", "training.mel_bins=128")
    trainer = AutoencoderTrainer(config)
    rng = np.random.default_rng(1)
    t = np.arange(8192) / 44100.0
    audio = (0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * rng.standard_normal((1, 2, 8192))).astype(np.float32)
    decoded = (0.8 * audio + 0.05 * rng.standard_normal(audio.shape)).astype(np.float32)
    zero = jnp.zeros(())
    loss, metrics = trainer._generator_objective(
        jnp.asarray(audio), jnp.asarray(decoded), {"kl": jnp.asarray(0.5)},
        dict(adversarial=zero, feature_matching=zero, discriminator=zero), jnp.asarray(False))
    assert float(metrics["mel"]) == pytest.approx(mel_distance(audio[0], decoded[0], 44100), rel=1e-4)
    assert float(metrics["l1"]) == pytest.approx(float(np.mean(np.abs(decoded - audio))), rel=1e-5)
    assert float(loss) == pytest.approx(float(metrics["spectral"]) + 2.0 * float(metrics["mel"])
                                        + 3.0 * float(metrics["l1"]) + 1e-4 * 0.5, rel=1e-5)

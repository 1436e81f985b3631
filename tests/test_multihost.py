"""Multi-host diffusion training with real processes: 2 processes x 4 fake CPU devices joined on 127.0.0.1 (gloo)
against 1 process x 8 devices, through the real CLI on real precomputed latents.

- The global batches the two processes assemble (each from its own Grain shard) equal the one process's.
- The 2-process run is preempted: SIGTERM reaches process 1 only, after step 1; the processes agree on it at the
  next sync point (step 2), both save step 2 and exit 0. Relaunched, they resume, finish and write the demos.
  Losses of steps 1..4 and the whole final state (params, EMA, optimiser) match the uninterrupted 1-process run.
- A process killed (SIGKILL) or frozen (SIGSTOP) while the other waits in a collective with it makes the survivor
  exit with an error: at once when the dead peer's sockets close, after distributed.heartbeat_timeout_s when the
  peer is silent.
Children compile with unoptimised LLVM codegen (process_fixtures.FAST_CODEGEN), the 1-process reference too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from musicdiff.config import load_config
from musicdiff.parallel import make_mesh, shard_batch
from musicdiff.training import loop
from musicdiff.training.diffusion import latent_batches
from musicdiff.metrics import read_metrics
from tests.precompute_fixtures import REPO
from tests.process_fixtures import (FAST_CODEGEN, cluster_flags, compile_cache_env, device_env, read_state,
                                   start_cluster, tail, wait_all)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 4
TIMEOUT_S = 600  # per launch; a hang fails the test instead of stalling the suite
HEARTBEAT_S = 5
OVERRIDES = ["batch_size=8", "mesh.data=2", "mesh.fsdp=4", "model.depth=1", f"training.num_steps={STEPS}",
             "training.checkpoint_every=100", "training.log_every=1", "training.preemption_sync_every=2"]
TWO_PROCESSES = ["--config.mesh.dcn_shape.data=2"]  # the hybrid ICI x DCN mesh, each process one DCN granule

CHILD = """
import os, signal, sys, time
from pathlib import Path

from launch.common import run
from musicdiff.training.runner import train

SIGNAL_AT_STEP = int(os.environ.get("SIGNAL_AT_STEP", "0"))


def dump_global_batches(config, path, count):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from musicdiff.parallel import mesh_and_rules, shard_batch
    from musicdiff.training import loop
    from musicdiff.training.diffusion import latent_batches

    mesh, rules = mesh_and_rules(config)
    batches = iter(latent_batches(config, mesh, rules))
    out = {}
    for index in range(count):
        batch = shard_batch(loop.device_arrays(next(batches)), mesh, rules, int(config.batch_size))
        for name, array in batch.items():
            out[f"{index}/{name}"] = multihost_utils.process_allgather(array, tiled=True)
        if index + 1 == int(os.environ.get("SIGNAL_AFTER_BATCHES", "0")):  # the peer goes on to the next gather
            Path(os.environ["SIGNAL_MARKER"]).write_text(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_NAME"]))
    if jax.process_index() == 0:
        np.savez(path, **out)


def stage(config, workdir):
    if os.environ.get("DUMP_BATCHES"):
        dump_global_batches(config, os.environ["DUMP_BATCHES"], int(os.environ["DUMP_COUNT"]))

    def on_state(step, state):
        if step == SIGNAL_AT_STEP:
            Path(os.environ["SIGNAL_MARKER"]).write_text(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_NAME"]))

    return train(config, workdir, default_trainer="diffusion", on_state=on_state if SIGNAL_AT_STEP else None)


sys.argv = ["train"] + sys.argv[1:]
run(stage)
"""


@pytest.fixture(scope="module")
def setup(tiny_latents, tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    return dict(base=base, latents=tiny_latents, env=compile_cache_env(base / "compile_cache"))


def child_args(setup, workdir, *extra):
    flags = [f"--config.{o}" for o in OVERRIDES] + [f"--config.data.latents={setup['latents']}"]
    return ["-c", CHILD, "--config=configs/diffusion.py:tiny", *flags, f"--workdir={workdir}", *extra]


def launch_two(setup, workdir, *extra, env=None, env_of=None):
    procs = start_cluster(lambda pid, address: child_args(setup, workdir, *TWO_PROCESSES, *extra,
                                                          *cluster_flags(address, 2, pid)),
                          processes=2, devices=4, env={**setup["env"], **(env or {})}, env_of=env_of,
                          xla_flags=FAST_CODEGEN)
    return procs, wait_all(procs, TIMEOUT_S)


@pytest.fixture(scope="module")
def one_process(setup):
    workdir = setup["base"] / "one_process"
    done = subprocess.run([sys.executable, *child_args(setup, workdir)], cwd=REPO, capture_output=True, text=True,
                          env=device_env(8, FAST_CODEGEN, **setup["env"]), timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_two_processes_preempted_and_resumed_match_one_process(setup, one_process, measurement):
    workdir = setup["base"] / "two_processes"
    marker = setup["base"] / "sigterm_sent"
    dump = setup["base"] / "global_batches.npz"
    procs, outputs = launch_two(
        setup, workdir, env={"DUMP_BATCHES": str(dump), "DUMP_COUNT": str(STEPS)},
        env_of=lambda pid: {"SIGNAL_AT_STEP": "1", "SIGNAL_NAME": "SIGTERM", "SIGNAL_MARKER": str(marker)}
        if pid == 1 else {})
    assert [p.returncode for p in procs] == [0, 0], tail(outputs)
    assert marker.exists()
    for output in outputs:  # process 0 never got the signal; it stops with process 1 at the sync point
        assert "preempted: stopped at step 2" in output, tail(outputs)
    assert "topology: 2 process(es) x 4 local device(s) = 8 cpu device(s)" in outputs[0]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2]

    # The resumed run also makes its demos at the last step: every process samples (the EMA weights are sharded
    # over both), process 0 alone decodes and writes.
    procs, outputs = launch_two(setup, workdir, f"--config.training.demo_every={STEPS}",
                                "--config.training.demo_steps=2")
    assert [p.returncode for p in procs] == [0, 0], tail(outputs)
    assert all("resumed from step 2" in output for output in outputs), tail(outputs)
    assert sorted(p.name for p in (workdir / "demos" / str(STEPS)).iterdir()) == ["0.wav", "1.wav"]

    # The global batches assembled from the two processes' shards are the one-process batches, bit for bit.
    config = load_config(f"{REPO}/configs/diffusion.py:tiny", OVERRIDES + [f"data.latents={setup['latents']}"])
    mesh, rules = make_mesh(config.mesh), tuple(tuple(rule) for rule in config.sharding_rules)
    reference_batches = iter(latent_batches(config, mesh, rules))
    with np.load(dump) as assembled:
        for index in range(STEPS):
            batch = shard_batch(loop.device_arrays(next(reference_batches)), mesh, rules)
            for name, array in batch.items():
                np.testing.assert_array_equal(assembled[f"{index}/{name}"], np.asarray(array), err_msg=name)

    # One writer (process 0): each step logged once per launch, launch 1 steps 1-2, launch 2 steps 3-4.
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4], logged
    ours = {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}
    theirs = {r["step"]: r["loss"] for r in read_metrics(one_process / "metrics.jsonl")}
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    loss_error = max(abs(ours[step] - theirs[step]) for step in ours)
    measurement("max |loss difference| over steps 1-4 (2x4 preempted+resumed vs 1x8)", loss_error)
    assert loss_error <= 1e-6, (ours, theirs)

    a, b = read_state(workdir / "checkpoints" / str(STEPS)), read_state(one_process / "checkpoints" / str(STEPS))
    assert sorted(a) == sorted(b)
    errors = {name: float(np.max(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))))
              if a[name].size else 0.0 for name in a}
    identical = sum(np.array_equal(a[name], b[name]) for name in a)
    measurement("max |state difference| at step 4 (params, EMA, optimiser)", max(errors.values()))
    measurement("bit-identical state arrays", f"{identical} of {len(a)}")
    assert max(errors.values()) <= 1e-6, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    np.testing.assert_array_equal(a["step"], STEPS)


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_frozen_process_makes_the_other_exit(setup, signal_name, measurement):
    """Process 1 is killed (its sockets close: the collective fails at once) or frozen (its sockets stay open and
    the collective would wait forever: only the coordination service's heartbeat timeout ends it) between two
    all-gathers of global batches. Process 0, in the second one, must exit with an error within about
    distributed.heartbeat_timeout_s."""
    marker = setup["base"] / f"{signal_name}_sent"
    procs = start_cluster(
        lambda pid, address: child_args(setup, setup["base"] / signal_name, *TWO_PROCESSES,
                                        f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
                                        *cluster_flags(address, 2, pid)),
        processes=2, devices=4, xla_flags=FAST_CODEGEN,
        env={**setup["env"], "DUMP_BATCHES": str(setup["base"] / "unused.npz"), "DUMP_COUNT": "100000"},
        env_of=lambda pid: {"SIGNAL_AFTER_BATCHES": "2", "SIGNAL_NAME": signal_name, "SIGNAL_MARKER": str(marker)}
        if pid == 1 else {})
    try:
        survivor_exit = None
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and survivor_exit is None:
            if procs[0].poll() is not None:
                survivor_exit = time.time()
            time.sleep(0.1)
    finally:
        procs[1].kill()  # a frozen process 1 stays stopped until killed
        outputs = wait_all(procs, 60)
    assert survivor_exit is not None and procs[0].returncode != 0, tail(outputs)
    waited = survivor_exit - float(marker.read_text())
    measurement(f"seconds until process 0 exited after {signal_name} of process 1", waited)
    assert waited < 3 * HEARTBEAT_S + 10, (waited, tail(outputs))
    if signal_name == "SIGKILL":
        assert "another process has probably died" in outputs[0], tail(outputs)
    else:  # the coordination service declared the silent process dead
        assert waited >= HEARTBEAT_S / 2 and "another task died" in outputs[0], (waited, tail(outputs))

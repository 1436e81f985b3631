"""Multi-host autoencoder training with real processes: 2 processes x 4 fake CPU devices joined on 127.0.0.1 (gloo)
against 1 process x 8 devices, through the real CLI on a rendered audio folder (generator and discriminator steps).

The 2-process run is preempted: SIGTERM reaches process 1 only, after step 1; both processes stop at the next sync
point (step 2), save it and exit 0. Losses of steps 1 and 2 and the whole state saved at step 2 (both models, EMA,
both optimisers) match the uninterrupted 1-process run's: each process read only its own rows of every global batch
(sharding.process_batch_rows), and together they read the 1-process batches. (Resuming a preempted multi-process
run is tested with the diffusion trainer in test_multihost.py; both stages share training/loop.py.)
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from musicdiff.metrics import read_metrics
from tests.autoencoder_fixtures import SMALL_MODEL, render_folder
from tests.precompute_fixtures import REPO
from tests.process_fixtures import (FAST_CODEGEN, cluster_flags, device_env, read_state, start_cluster, tail,
                                   wait_all)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 4
TIMEOUT_S = 600  # per launch; a hang fails the test instead of stalling the suite
OVERRIDES = [*SMALL_MODEL, "mesh.data=2", "mesh.fsdp=4", f"training.num_steps={STEPS}", "training.warmup_steps=0",
             "training.checkpoint_every=100", "training.log_every=1", "training.demo_every=0",
             "training.preemption_sync_every=2"]
TWO_PROCESSES = ["--config.mesh.dcn_shape.data=2"]
# Float32 reductions over the batch and the fsdp shards run in another order across processes than within one; the
# measured differences after 2 steps are printed with the results.
TOLERANCE = 1e-5

CHILD = """
import os, signal, sys

from launch.common import run
from musicdiff.training.runner import train

SIGNAL_AT_STEP = int(os.environ.get("SIGNAL_AT_STEP", "0"))


def stage(config, workdir):
    def on_state(step, state):
        if step == SIGNAL_AT_STEP:
            os.kill(os.getpid(), signal.SIGTERM)

    return train(config, workdir, default_trainer="autoencoder", on_state=on_state if SIGNAL_AT_STEP else None)


sys.argv = ["train"] + sys.argv[1:]
run(stage)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost_autoencoder")
    # No persistent compilation cache: the 1x8 reference and the two 2x4 processes compile programs of different keys
    # (nothing would load), and writing every program cost time.
    return dict(base=base, root=render_folder(base / "audio"), env={})


def child_args(setup, workdir, *extra):
    flags = [f"--config.{o}" for o in OVERRIDES] + [f"--config.data.root={setup['root']}"]
    return ["-c", CHILD, "--config=configs/autoencoder.py:tiny", *flags, f"--workdir={workdir}", *extra]


def launch_two(setup, workdir, env_of):
    procs = start_cluster(lambda pid, address: child_args(setup, workdir, *TWO_PROCESSES,
                                                          *cluster_flags(address, 2, pid)),
                          processes=2, devices=4, env=setup["env"], env_of=env_of, xla_flags=FAST_CODEGEN)
    return procs, wait_all(procs, TIMEOUT_S)


def test_two_processes_preempted_and_resumed_match_one_process(setup, measurement):
    # The uninterrupted reference runs just the 2 steps compared (a generator and a discriminator step; the learning
    # rates do not depend on num_steps) and saves its last one.
    one = setup["base"] / "one_process"
    done = subprocess.run([sys.executable, *child_args(setup, one, "--config.training.num_steps=2")], cwd=REPO,
                          capture_output=True, text=True, env=device_env(8, FAST_CODEGEN, **setup["env"]),
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]

    two = setup["base"] / "two_processes"
    procs, outputs = launch_two(setup, two, env_of=lambda pid: {"SIGNAL_AT_STEP": "1"} if pid == 1 else {})
    assert [p.returncode for p in procs] == [0, 0], tail(outputs)
    for output in outputs:
        assert "preempted: stopped at step 2" in output, tail(outputs)
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [2]

    ours = {r["step"]: r for r in read_metrics(two / "metrics.jsonl")}
    theirs = {r["step"]: r for r in read_metrics(one / "metrics.jsonl")}
    assert sorted(ours) == sorted(theirs) == [1, 2]
    assert {ours[s]["discriminator_step"] for s in ours} == {0.0, 1.0}  # both step kinds ran
    for key in ("loss", "discriminator_loss"):
        error = max(abs(ours[s][key] - theirs[s][key]) / max(abs(theirs[s][key]), 1e-6) for s in ours)
        measurement(f"max relative {key} difference over steps 1-2 (2x4 preempted vs 1x8)", error)
        assert error <= TOLERANCE, (key, ours, theirs)

    a, b = read_state(two / "checkpoints" / "2"), read_state(one / "checkpoints" / "2")
    assert sorted(a) == sorted(b)
    params = [name for name in a if not name.startswith("opt_state") and a[name].dtype.kind == "f"]
    errors = {name: float(np.max(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))))
              if a[name].size else 0.0 for name in params}
    measurement("max |parameter/EMA difference| at step 2", max(errors.values()))
    assert max(errors.values()) <= TOLERANCE, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    moments = [name for name in a if name.startswith("opt_state") and a[name].dtype.kind == "f" and a[name].size]
    relative = {name: float(np.max(np.abs(a[name].astype(np.float64) - b[name])) /
                            max(float(np.max(np.abs(b[name]))), 1e-12)) for name in moments}
    measurement("max optimiser-moment difference at step 2 (relative to the tensor's largest)",
                max(relative.values()))
    assert max(relative.values()) <= 1e-3, sorted(relative.items(), key=lambda kv: -kv[1])[:5]
    np.testing.assert_array_equal(a["step"], 2)

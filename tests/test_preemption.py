"""Preemption through the real CLI: SIGTERM sent from outside (as a scheduler does) makes a training run save a
checkpoint at the next step boundary and exit 0; rerunning the same command resumes from it and reaches the same
losses and final state as a run that was never interrupted. The stage is a small regression trained by the shared
loop (training/loop.py: Preemption, run, restore_or_init) with a checkpointed Grain iterator."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np

from musicdiff.metrics import read_metrics
from tests.process_fixtures import REPO, device_env, read_state

STEPS = 12

CONFIG = """
import ml_collections
from musicdiff.parallel import mesh_config

def get_config():
    return ml_collections.ConfigDict(dict(
        seed=0, batch_size=8, mesh=mesh_config(data=-1),
        training=dict(num_steps=%d, log_every=1, checkpoint_every=1000, learning_rate=0.1, step_delay_s=0.0)))
""" % STEPS

STAGE = """
import os, sys, time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np

from launch.common import run
from musicdiff.metrics import MetricLogger
from musicdiff.parallel import mesh_and_rules
from musicdiff.training import loop


def stage(config, workdir):
    schedule = loop.Schedule.from_config(config.training)
    mesh, rules = mesh_and_rules(config)
    target = np.linspace(-1.0, 1.0, 16).astype(np.float32)

    def example(index):
        rng = np.random.default_rng(index)
        x = rng.standard_normal(16).astype(np.float32)
        return {"x": x, "y": np.float32(x @ target)}

    dataset = grain.MapDataset.range(10_000).map(example).batch(int(config.batch_size)).to_iter_dataset()
    data_iter = iter(dataset)

    def init(key):
        return {"w": jax.random.normal(key, (16,)) * 0.1, "step": jnp.zeros((), jnp.int32)}

    def step_fn(state, batch):
        def loss_fn(w):
            return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

        loss, grad = jax.value_and_grad(loss_fn)(state["w"])
        lr = float(config.training.learning_rate)
        return {"w": state["w"] - lr * grad, "step": state["step"] + 1}, {"loss": loss}

    def slow_down(step, state):
        Path(workdir, "last_step").write_text(str(step))
        time.sleep(float(config.training.step_delay_s))

    with loop.open_checkpointer(workdir, schedule) as checkpointer:
        state, shardings, start = loop.restore_or_init(checkpointer, init, mesh, rules, (jax.random.key(0),),
                                                       data_iter=data_iter)
        spec = loop.device_arrays(next(iter(dataset)))
        compiled = loop.compile_step(step_fn, shardings, loop.batch_shardings(spec, mesh, rules), mesh, rules)
        with MetricLogger(workdir, total_steps=schedule.num_steps, initial_step=start, log_every=1,
                          progress=False, tensorboard=False) as logger:
            _, result = loop.run(state=state, step_fn=compiled, batches=data_iter, start_step=start,
                                 schedule=schedule, checkpointer=checkpointer, logger=logger, mesh=mesh, rules=rules,
                                 config=config, data_iter=data_iter, on_state=slow_down)
    return result


sys.argv = ["train"] + sys.argv[1:]
run(stage)
"""


def command(config_file, workdir, *extra):
    return [sys.executable, "-c", STAGE, f"--config={config_file}", f"--workdir={workdir}", *extra]


def test_sigterm_saves_exits_zero_and_the_rerun_resumes_exactly(tmp_path):
    config_file = tmp_path / "toy.py"
    config_file.write_text(CONFIG)
    env = device_env(8)

    straight = subprocess.run(command(config_file, tmp_path / "straight"), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(command(config_file, workdir, "--config.training.step_delay_s=0.5"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            last = workdir / "last_step"
            if last.exists() and last.read_text() and int(last.read_text()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    stopped = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= stopped < STEPS, stopped
    assert f"preempted: stopped at step {stopped}" in stderr
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped]  # saved at the step boundary right after the signal, not at an interval

    resumed = subprocess.run(command(config_file, workdir), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped}" in resumed.stderr

    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s] for s in a] == [b[s] for s in a]  # full-precision JSON floats: bit-identical
    final_a = read_state(tmp_path / "straight" / "checkpoints" / str(STEPS))
    final_b = read_state(workdir / "checkpoints" / str(STEPS))
    for name in final_a:
        np.testing.assert_array_equal(final_a[name], final_b[name], err_msg=name)

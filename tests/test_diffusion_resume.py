"""Bit-exact resume of diffusion training: 2N steps in one run == N steps, kill -9, resume to 2N (losses of steps
N+1..2N in metrics.jsonl and the final parameters), through the real CLI on real precomputed latents."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines.latent_source import read_manifest
from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.metrics import read_metrics
from tests.process_fixtures import FAST_CODEGEN, compile_cache_env, device_env

N = 2  # the property (steps N+1..2N and the final state equal after a kill at N) needs no longer runs
TRAIN_FLAGS = ["--config=configs/diffusion.py:tiny", "--config.batch_size=8", "--config.mesh.data=2",
               "--config.mesh.fsdp=4", f"--config.training.num_steps={2 * N}", f"--config.training.checkpoint_every={N}",
               "--config.training.log_every=1"]

KILL_AFTER_CHECKPOINT = """
import os, signal, sys, time
import orbax.checkpoint as ocp
from launch.common import run
from musicdiff.training.runner import train
N = int(os.environ["KILL_AT_STEP"])

def stage(config, workdir):
    def on_state(step, state):
        if step == N:  # once step N's checkpoint is complete on disk, die without any cleanup
            deadline = time.time() + 120
            while N not in ocp.step.checkpoint_steps(workdir / "checkpoints") and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
    train(config, workdir, default_trainer="diffusion", on_state=on_state)

sys.argv = ["train"] + sys.argv[1:]
run(stage)
"""


@pytest.fixture(scope="module")
def latents(tiny_latents):
    assert read_manifest(tiny_latents)["latent_frames"] == 32
    return tiny_latents


def train(args, workdir, env_extra=None, script=None):
    # The three runs share compiled programs (a persistent cache beside the workdirs) and unoptimised LLVM codegen:
    # every run compiles or loads the same programs, so bit-exactness between them is unaffected.
    cache = compile_cache_env(workdir.parent / "compile_cache")
    env = device_env(8, FAST_CODEGEN, **cache, **(env_extra or {}))
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "launch.train_diffusion"]
    return subprocess.run(command + args + [f"--workdir={workdir}"], capture_output=True, text=True, timeout=600,
                          env=env)


def final_params(workdir):
    ref = find_checkpoint(workdir)
    assert ref.step == 2 * N
    return [np.asarray(x) for name in ("model", "conditioner")
            for x in jax.tree.leaves(load_model(ref, name, prefer_ema=False))]


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(latents, tmp_path):
    args = TRAIN_FLAGS + [f"--config.data.latents={latents}"]
    straight = train(args, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = train(args, tmp_path / "resumed", {"KILL_AT_STEP": str(N)}, KILL_AFTER_CHECKPOINT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert find_checkpoint(tmp_path / "resumed").step == N
    resumed = train(args, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {N}" in resumed.stderr

    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")}
    for step in range(N + 1, 2 * N + 1):
        assert a[step] == b[step], (step, a[step], b[step])  # full-precision floats from JSON: bit-identical
    for x, y in zip(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")):
        np.testing.assert_array_equal(x, y)
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time"} <= set(lines[-1])

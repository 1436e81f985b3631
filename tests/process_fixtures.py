"""CLI and multi-process runs for tests, and reading their checkpoints back.

Real multi-process JAX runs: P processes x D fake CPU devices joined on 127.0.0.1 (gloo collectives).

Every child gets XLA_FLAGS with its device count before it imports JAX (through its environment), and every wait
has a timeout, so a hang fails the test instead of stalling the suite. `compile_cache_env` lets the launches of one
test module share compiled programs (JAX writes cache entries from process 0 only).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# LLVM codegen without optimisation: compiles the CPU programs about twice as fast. HLO passes (fusion, SPMD
# partitioning, collectives) are unchanged, so parallel runs compared under it stay comparable.
FAST_CODEGEN = ("--xla_backend_optimization_level=0",)


def device_env(devices: int, xla_flags: Sequence[str] = (), **extra: str) -> dict[str, str]:
    """The environment of a child process with `devices` fake CPU devices (and further XLA flags)."""
    flags = " ".join((f"--xla_force_host_platform_device_count={devices}", *xla_flags))
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def compile_cache_env(directory: Path) -> dict[str, str]:
    return {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def cluster_flags(address: str, processes: int, process_id: int) -> list[str]:
    return [f"--coordinator={address}", f"--num_processes={processes}", f"--process_id={process_id}"]


def start_cluster(command: Callable[[int, str], Sequence[str]], processes: int, devices: int,
                  env: dict[str, str] | None = None, env_of: Callable[[int], dict[str, str]] | None = None,
                  xla_flags: Sequence[str] = ()) -> list[subprocess.Popen]:
    """Starts `processes` children; `command(process_id, coordinator_address)` gives each one's argv (after the
    interpreter), `env_of(process_id)` extra environment for one of them."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for process_id in range(processes):
        child_env = device_env(devices, xla_flags, **(env or {}), **((env_of or (lambda _: {}))(process_id)))
        procs.append(subprocess.Popen([sys.executable, *command(process_id, address)], cwd=REPO, env=child_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs: Sequence[subprocess.Popen], timeout_s: float) -> list[str]:
    """Every child's output once all exited; kills them all (and fails) when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def tail(outputs: Sequence[str], chars: int = 3000) -> str:
    return "\n".join(f"--- process {i} ---\n{out[-chars:]}" for i, out in enumerate(outputs))


def read_state(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint step's state as NumPy, by name (params, ema, opt_state, step, rng), whatever
    mesh or process count wrote it."""
    import orbax.checkpoint as ocp
    from etils import epath

    handler = ocp.PyTreeCheckpointHandler()
    try:
        path = epath.Path(step_dir) / "state"
        names = dict(getattr(handler.metadata(path), "tree", handler.metadata(path)))
        args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in names}
        return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        handler.close()

"""Several JAX processes (hosts): joining the cluster, the topology log, barriers between processes.

Every stage whose config has a `distributed` section runs multi-host with no code change: launch/common.py calls
`initialize_distributed(config.distributed)` before anything touches the devices, the mesh spans the devices of all
processes (musicdiff.parallel.mesh), each process reads its own rows of every global batch
(sharding.process_batch_rows -> the Grain pipelines -> jax.make_array_from_process_local_data), only process 0
writes logs and TensorBoard (training.metrics), and every process takes part in Orbax saves (training.checkpoint).

Config section `distributed` (`distributed_config()`):
- enabled: join a cluster; every process runs the same command.
- coordinator_address ("host:port" of process 0), num_processes, process_id: an explicit cluster. Left empty / 0 /
  -1, JAX detects them: Cloud TPU VMs and GKE TPU node pools (TPU metadata, TPU_WORKER_HOSTNAMES), SLURM (SLURM_*
  variables: process = SLURM_PROCID, coordinator = first node of SLURM_STEP_NODELIST), Open MPI. An address may
  also come from JAX_COORDINATOR_ADDRESS.
- local_device_ids: "" = JAX's choice (all local devices; one GPU per process, GPU SLURM_LOCALID, under SLURM and
  Open MPI), or comma-separated ids, e.g. "0,1,2,3,4,5,6,7" for one process per 8-GPU node.
- cluster_detection_method: "" (try every known environment) or one of JAX's: "slurm", "ompi", "gcetpu" (TPU VMs),
  "gketpu" (GKE TPU node pools), "mpi4py", "deactivate".
- cpu_collectives: cross-process collectives of the CPU backend ("gloo"; "" keeps JAX's default).
- initialization_timeout_s: how long a process waits for all of them to join; then JAX aborts it
  (DEADLINE_EXCEEDED at RegisterTask), right after the logged line that names the coordinator and process.
- heartbeat_timeout_s: a process that sent no heartbeat for this long is declared dead; the coordination service
  then terminates every other process with "Terminating process because the JAX distributed service detected
  fatal errors ... another task died" (exit by SIGABRT) instead of letting it hang in a collective forever.
- shutdown_timeout_s: how long a finishing process waits at exit for the others to finish too.

Barriers go through the coordination service (as Orbax's do), not through a device collective, so one process may
wait at a barrier for hours while another still works.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import ml_collections

from musicdiff.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)
DETECTION_METHODS = ("", "slurm", "ompi", "gcetpu", "gketpu", "mpi4py", "deactivate")
_TOPOLOGY_LOGGED = False
_BARRIERS = 0
_MAX_RUNS = 32  # of the topology line's device-owner runs


def distributed_config(enabled: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        enabled=enabled, coordinator_address="", num_processes=0, process_id=-1, local_device_ids="",
        cluster_detection_method="", cpu_collectives="gloo", initialization_timeout_s=300, heartbeat_timeout_s=100,
        shutdown_timeout_s=300))


def _local_device_ids(text: str) -> list[int] | None:
    if not str(text).strip():
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"config.distributed.local_device_ids={text!r}: give comma-separated device ids, e.g. "
                          f"0,1,2,3") from None


def initialize_arguments(section: ml_collections.ConfigDict) -> dict:
    """The keyword arguments of `jax.distributed.initialize` for a `distributed` section (unset values: None)."""
    method = str(section.get("cluster_detection_method", ""))
    if method not in DETECTION_METHODS:
        raise ConfigError(f"config.distributed.cluster_detection_method={method!r}: choose one of "
                          f"{', '.join(repr(m) for m in DETECTION_METHODS)}")
    num_processes = int(section.get("num_processes", 0))
    process_id = int(section.get("process_id", -1))
    if num_processes > 0 and process_id >= num_processes:
        raise ConfigError(f"config.distributed.process_id={process_id}: must be in [0, num_processes={num_processes})")
    for key in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
        if int(section.get(key, 1)) <= 0:
            raise ConfigError(f"config.distributed.{key}={section.get(key)}: must be a positive number of seconds")
    return dict(
        coordinator_address=str(section.get("coordinator_address", "")) or None,
        num_processes=num_processes if num_processes > 0 else None,
        process_id=process_id if process_id >= 0 else None,
        local_device_ids=_local_device_ids(section.get("local_device_ids", "")),
        cluster_detection_method=method or None,
        initialization_timeout=int(section.get("initialization_timeout_s", 300)),
        heartbeat_timeout_seconds=int(section.get("heartbeat_timeout_s", 100)),
        shutdown_timeout_seconds=int(section.get("shutdown_timeout_s", 300)),
    )


def initialize_distributed(section: ml_collections.ConfigDict | None) -> bool:
    """Joins the cluster the section describes; returns whether this call joined it (False when the section is
    absent or disabled, or the process already joined). Raises DistributedError when the cluster cannot be joined
    within `initialization_timeout_s`."""
    if section is None or not section.get("enabled", False):
        return False
    import jax
    from jax._src import xla_bridge

    if jax.distributed.is_initialized():
        return False
    kwargs = initialize_arguments(section)
    if xla_bridge.backends_are_initialized():
        raise DistributedError("config.distributed.enabled: JAX's devices were used before jax.distributed could "
                               "start; join the cluster first (launch.common.run does)")
    if section.get("cpu_collectives", ""):
        jax.config.update("jax_cpu_collectives_implementation", str(section.cpu_collectives))
    where = kwargs["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the detected coordinator"
    who = (f"process {kwargs['process_id'] if kwargs['process_id'] is not None else '(detected)'} of "
           f"{kwargs['num_processes'] or '(detected)'}")
    # JAX aborts the process (DEADLINE_EXCEEDED at RegisterTask) when the cluster is not complete in time; this line
    # is what such a log shows last.
    log.info("%s on %s: joining the cluster at %s; waiting up to %d s for every process (a DEADLINE_EXCEEDED abort "
             "means some did not start or cannot reach the coordinator)", who, socket.gethostname(), where,
             kwargs["initialization_timeout"])
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:  # auto-detection found no cluster, or detected values are inconsistent
        raise ConfigError(f"config.distributed.enabled: {err}; no TPU VM, SLURM or Open MPI environment supplies "
                          f"the cluster, so pass --coordinator=HOST:PORT --num_processes=N --process_id=I (or "
                          f"config.distributed.coordinator_address/num_processes/process_id)") from None
    except Exception as err:  # XlaRuntimeError, RuntimeError
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"{who} on {socket.gethostname()} could not join the cluster at {where} ({first_line}); start every "
            f"process with the same coordinator address and process count and check that process 0's port is "
            f"reachable") from None
    from jax._src import distributed as jax_distributed

    log.info("joined the cluster at %s as process %d of %d (heartbeat timeout %d s)",
             jax_distributed.global_state.coordinator_address, jax.process_index(), jax.process_count(),
             kwargs["heartbeat_timeout_seconds"])
    return True


def topology_summary(mesh=None) -> str:
    """One line: processes, devices per process, platform and kind, and the mesh (shape and which process owns which
    of its devices)."""
    import jax

    devices = jax.devices()
    per_process: dict[int, int] = {}
    for device in devices:
        per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
    counts = sorted(set(per_process.values()))
    local = str(counts[0]) if len(counts) == 1 else "/".join(str(per_process[p]) for p in sorted(per_process))
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    text = (f"{jax.process_count()} process(es) x {local} local device(s) = {len(devices)} {devices[0].platform} "
            f"device(s) ({devices[0].device_kind}")
    text += f", {len(slices)} slices)" if len(slices) > 1 else ")"
    if mesh is not None:
        shape = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
        text += f"; mesh {shape}; owning process of the mesh devices in order: {_runs(mesh.devices.flat)}"
    return text


def _runs(devices) -> str:
    """Process indices of devices as runs, "0x4 1x4" for 0 0 0 0 1 1 1 1."""
    runs: list[list[int]] = []
    for device in devices:
        if runs and runs[-1][0] == device.process_index:
            runs[-1][1] += 1
        else:
            runs.append([device.process_index, 1])
    shown = " ".join(f"{p}x{n}" for p, n in runs[:_MAX_RUNS])
    return shown + (f" ... ({len(runs) - _MAX_RUNS} more runs)" if len(runs) > _MAX_RUNS else "")


def log_topology(mesh=None) -> None:
    """Logs `topology_summary` once per process lifetime, on process 0 only."""
    global _TOPOLOGY_LOGGED
    import jax

    if _TOPOLOGY_LOGGED:
        return
    _TOPOLOGY_LOGGED = True
    if jax.process_index() == 0:
        log.info("topology: %s", topology_summary(mesh))


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def on_main_process(name: str, fn: Callable[[], object], timeout_s: float = 3600.0) -> None:
    """Runs `fn` on process 0 (writes to a shared directory) while the others wait at a barrier named after `name`
    (numbered, so the same call may repeat: every process makes the same calls in the same order)."""
    global _BARRIERS
    _BARRIERS += 1
    if is_main_process():
        fn()
    barrier(f"{name}_{_BARRIERS}", timeout_s)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Blocks until every process reached the barrier `name` (each name used once); a no-op for one process."""
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination-service client; Orbax's barriers use it the same way

    client = distributed.global_state.client
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))


__all__ = ["barrier", "distributed_config", "initialize_arguments", "initialize_distributed", "is_main_process",
           "log_topology", "on_main_process", "topology_summary"]

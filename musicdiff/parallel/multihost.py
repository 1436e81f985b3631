"""Several JAX processes (hosts): start-up from a `distributed` config section and barriers between processes.

Config section (every multi-host stage may carry it):
- enabled: call `jax.distributed.initialize` before anything touches the devices.
- coordinator_address ("host:port"), num_processes, process_id: explicit cluster; leave the address empty to let JAX
  detect the cluster (TPU pods, SLURM, Open MPI).
- cpu_collectives: implementation of cross-process collectives on the CPU backend ("gloo"; "" leaves JAX's default).
- initialization_timeout_s: how long to wait for every process to join.

Barriers go through the coordination service that `jax.distributed` starts (as Orbax's do), not through a device
collective, so one process may wait at a barrier for hours while another still works.
"""

from __future__ import annotations

import ml_collections

from musicdiff.errors import ConfigError


def distributed_config(enabled: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(enabled=enabled, coordinator_address="", num_processes=1, process_id=0,
                                          cpu_collectives="gloo", initialization_timeout_s=300))


def initialize_distributed(section: ml_collections.ConfigDict | None) -> None:
    """Joins the cluster the section describes (a no-op when absent, disabled, or already joined)."""
    if section is None or not section.enabled:
        return
    import jax

    if jax.distributed.is_initialized():
        return
    if section.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", section.cpu_collectives)
    kwargs = dict(initialization_timeout=int(section.initialization_timeout_s))
    if section.coordinator_address:
        if not 0 <= section.process_id < section.num_processes:
            raise ConfigError(f"config.distributed.process_id={section.process_id}: must be in "
                              f"[0, num_processes={section.num_processes})")
        kwargs.update(coordinator_address=section.coordinator_address, num_processes=int(section.num_processes),
                      process_id=int(section.process_id))
    jax.distributed.initialize(**kwargs)


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


__all__ = ["barrier", "distributed_config", "initialize_distributed"]

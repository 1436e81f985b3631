"""What every CLI shares: `--config=FILE[:ARG]`, `--config.a.b=VALUE` overrides, `--workdir`, one-line errors, and
the multi-host start-up.

Multi-host: a stage whose config has a `distributed` section (musicdiff/parallel/distributed.py) joins the cluster
before anything touches the devices when `--config.distributed.enabled=True` (TPU VMs, SLURM and Open MPI are
detected), or when `--coordinator=HOST:PORT --num_processes=N --process_id=I` name the cluster explicitly. Every
process runs the same command on the same (shared) workdir. A stage that returns a result with `preempted=True`
(a training run stopped by SIGTERM after saving its checkpoint) exits 0, or `--preempted_exit_code` for scheduler
scripts that requeue on it (launch/slurm.sbatch); rerunning the command resumes it. When one
process fails in a multi-process run it exits at once instead of waiting at JAX's shutdown barrier for peers that
may be stuck in a collective with it; they then fail within `distributed.heartbeat_timeout_s`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import app, flags

from musicdiff.config import load_config, to_dict, validate
from musicdiff.errors import ConfigError, DataError, DistributedError
from musicdiff.files import atomic_write_bytes
from musicdiff.parallel.distributed import initialize_distributed

flags.DEFINE_string("workdir", None, "Output directory of this stage.")
flags.DEFINE_string("coordinator", None, "Multi-host: HOST:PORT of process 0 (sets config.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
flags.DEFINE_integer("preempted_exit_code", 0, "Exit status after a stage stopped for preemption with its checkpoint "
                     "saved (0: a clean exit; a scheduler script can pick another value to requeue the job).")

Stage = Callable[[ml_collections.ConfigDict, Path], object]


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Separates `--config=...` and `--config.k=v` from the other flags."""
    spec, overrides, rest = None, [], []
    for arg in argv:
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return spec, overrides, rest


def apply_cluster_flags(config: ml_collections.ConfigDict, coordinator: str | None, num_processes: int | None,
                        process_id: int | None) -> None:
    """--coordinator/--num_processes/--process_id: an explicit cluster, written into config.distributed."""
    given = {key: value for key, value in (("coordinator_address", coordinator), ("num_processes", num_processes),
                                           ("process_id", process_id)) if value is not None}
    if not given:
        return
    if "distributed" not in config:
        raise ConfigError(f"--{'coordinator' if coordinator is not None else next(iter(given))}: this stage's config "
                          f"has no distributed section; it runs on one process")
    if len(given) != 3:
        raise ConfigError("--coordinator, --num_processes and --process_id go together (or set none of them and "
                          "let JAX detect the cluster with --config.distributed.enabled=True)")
    config.distributed.enabled = True
    for key, value in given.items():
        config.distributed[key] = value


def _multi_process() -> tuple[bool, int, int]:
    """(several processes, this process's index, count), without starting a backend that is not started yet."""
    if "jax" not in sys.modules:
        return False, 0, 1
    import jax

    if not jax.distributed.is_initialized():
        return False, 0, 1
    return jax.process_count() > 1, jax.process_index(), jax.process_count()


# Failures of a cross-process collective or of the coordination service: a peer is gone (or unreachable).
_PEER_FAILURE_MARKS = ("Gloo", "Connection closed", "Connection reset", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                       "heartbeat", "NCCL", "coordination service")


def _exit_after_failure(code: int, message: str) -> None:
    print(message, file=sys.stderr)
    several, index, count = _multi_process()
    if several:
        if any(mark in message for mark in _PEER_FAILURE_MARKS):
            print(f"error: process {index} of {count}: a collective with the other processes failed; another "
                  f"process has probably died or lost its network (see its log)", file=sys.stderr)
        # Skip JAX's shutdown barrier: the other processes may be blocked in a collective with this one and would
        # hold it there until shutdown_timeout_s. Gone, it makes them fail within heartbeat_timeout_s.
        print(f"error: process {index} of {count} is exiting; the other processes will stop too", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run(stage: Stage, default_config: str | None = None, needs_devices: bool = True) -> None:
    """Parses flags, loads and validates the config, joins the cluster, writes the config and runs the stage."""
    spec, overrides, rest = split_config_args(sys.argv)

    def parse(argv: list[str]) -> list[str]:
        return flags.FLAGS(argv)

    def main(_argv: list[str]) -> None:
        logging.getLogger().setLevel(logging.INFO)
        try:
            chosen = spec or default_config
            if chosen is None:
                raise ConfigError("--config is required, e.g. --config=configs/diffusion.py:tiny")
            config = load_config(chosen, overrides)
            if flags.FLAGS.workdir is None:
                raise ConfigError("--workdir is required: the directory this stage writes to")
            apply_cluster_flags(config, flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
            initialize_distributed(config.get("distributed"))  # before anything touches the devices
            if needs_devices:
                import jax

                validate(config, jax.device_count())
            else:
                validate(config, None)
            workdir = Path(flags.FLAGS.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            if _multi_process()[1] == 0:  # the workdir is shared: one writer
                atomic_write_bytes(workdir / "config.json",
                                   (json.dumps(to_dict(config), indent=2) + "\n").encode("utf-8"))
            result = stage(config, workdir)
        except (ConfigError, DataError) as err:
            _exit_after_failure(2, f"error: {err}")
        except DistributedError as err:
            _exit_after_failure(1, f"error: {err}")
        except Exception:
            if not _multi_process()[0]:
                raise
            _exit_after_failure(1, traceback.format_exc().rstrip())
        if getattr(result, "preempted", False):
            print(f"preempted: stopped at step {result.step} with its checkpoint saved in {workdir}; run the same "
                  f"command again to resume", file=sys.stderr)
            if flags.FLAGS.preempted_exit_code:
                sys.exit(flags.FLAGS.preempted_exit_code)

    app.run(main, argv=rest, flags_parser=parse)

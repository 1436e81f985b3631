"""The training loop's pieces (big_vision style): sharded state initialisation, step programs jit'ed with explicit
shardings and donated state, and one plain loop with checkpoints, metrics, demos and preemption. The stage runner
(training/runner.py) assembles them around a trainer (training/trainer.py).

- `init_state(init_fn, ...)`: `init_fn(key) -> state`, a pytree whose nnx Variables carry logical axis names
  (params, optimiser moments, EMA; plain arrays such as step and RNG key are replicated), evaluated under jit with
  the shardings the rules give, so no parameter is ever materialised unsharded.
- `compile_step` / `StepPrograms`: a pure `step(state, batch) -> (state, metrics)` jit'ed with in/out shardings and
  the state donated, traced inside the mesh's sharding context (a step is never lowered without it); one program per
  step kind, chosen on the host.
- `run`: stop on preemption (save, exit cleanly), next batch, step, queue metrics (read one step late), checkpoint
  when due, demos when due. Resume is the same call: `restore_or_init` picks up the latest checkpoint of the workdir,
  restoring the data iterator position with it.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from musicdiff.checkpoints import CHECKPOINT_DIR, Checkpointer, abstract_target
from musicdiff.metrics import MetricLogger
from musicdiff.parallel import param_shardings
from musicdiff.parallel.sharding import Rules, batch_sharding, shard_batch, sharding_context

log = logging.getLogger(__name__)


def init_state(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any) -> tuple[Any, Any]:
    """(state, shardings): `init_fn(*args)` evaluated under jit straight into its sharded layout."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, rules, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def state_shardings(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any) -> tuple[Any, Any]:
    """(abstract state with shardings, shardings) without computing anything: the restore target."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, rules, mesh)
    return abstract_target(abstract, shardings), shardings


def batch_shardings(batch_spec: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, NamedSharding]:
    """Every batch array is split along its leading (batch) dimension by the 'batch' rule."""
    lead = batch_sharding(mesh, rules)
    return {name: lead if np.ndim(value) else NamedSharding(mesh, P()) for name, value in batch_spec.items()}


def compile_step(step_fn: Callable[[Any, Any], tuple[Any, Any]], shardings: Any, batch_sharding_tree: Any,
                 mesh: Mesh, rules: Rules) -> Callable[[Any, Any], tuple[Any, Any]]:
    """jit with explicit shardings, traced in the mesh's sharding context (activations pinned by their logical
    names); the state is donated, metrics come back replicated."""

    def traced(state, batch):
        with sharding_context(mesh, rules):
            return step_fn(state, batch)

    replicated = NamedSharding(mesh, P())
    return jax.jit(traced, in_shardings=(shardings, batch_sharding_tree), out_shardings=(shardings, replicated),
                   donate_argnums=0)


class StepPrograms:
    """The loop's `step_fn` for trainers with several kinds of step: one compiled program per kind, picked on the
    host by a counter that mirrors the state's step (so choosing never waits for the device).

    One program holding every kind behind a `lax.switch` was measured first and rejected: XLA's CPU backend ran a
    branch inside the conditional 4-5x slower than the same code as its own program (autoencoder tiny preset,
    batch 4 x 16384: 17.2 s vs 3.1 s a step on a loaded 2-core machine), and XLA:GPU's conditional copies its
    predicate to the host anyway. Programs compile on first use.
    """

    def __init__(self, kinds: tuple[Any, ...], step_for: Callable[[Any], Callable], kind_of: Callable[[int], Any],
                 shardings: Any, batch_sharding_tree: Any, mesh: Mesh, rules: Rules, start_step: int):
        self.kind_of = kind_of
        self.next_step = int(start_step)
        self.programs = {kind: compile_step(step_for(kind), shardings, batch_sharding_tree, mesh, rules)
                         for kind in kinds}

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
        kind = self.kind_of(self.next_step)
        if kind not in self.programs:
            raise ValueError(f"step {self.next_step} is a {kind!r} step, which the run's steps were not expected to "
                             f"reach (kinds compiled: {', '.join(map(str, self.programs))}); rebuild the trainer for "
                             f"the longer run")
        self.next_step += 1
        return self.programs[kind](state, batch)


def device_arrays(host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The numeric arrays of a host batch (captions and other strings stay on the host)."""
    out = {}
    for name, value in host_batch.items():
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            out[name] = array
    return out


class Preemption:
    """SIGTERM (and SIGINT when asked) sets a flag; the loop saves at the next step boundary and returns.

    With several processes the flag is combined across all of them every `sync_every` steps, so every process
    stops at the same step and takes part in the same save. As a context manager it restores the previous handlers
    on exit; a stage opens it before compiling so a signal during start-up is not lost.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), sync_every: int = 10):
        self.flag = False
        self.sync_every = max(1, sync_every)
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, nothing to restore
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: saving a checkpoint at the next step boundary, then exiting", signum)
        self.flag = True

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.flag
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclasses.dataclass
class Schedule:
    """Steps at which the loop logs, saves and runs demos."""

    num_steps: int
    log_every: int = 10
    checkpoint_every: int = 1000
    demo_every: int = 0  # 0: no demos
    keep_checkpoints: int = 3
    keep_period: int | None = None
    save_initial: bool = False  # also checkpoint the initial state (step 0): a baseline for evaluation series
    preemption_sync_every: int = 10  # multi-process: steps between combining the processes' SIGTERM flags

    @classmethod
    def from_config(cls, training: Mapping[str, Any]) -> Schedule:
        return cls(num_steps=int(training["num_steps"]), log_every=int(training.get("log_every", 10)),
                   checkpoint_every=int(training.get("checkpoint_every", 1000)),
                   demo_every=int(training.get("demo_every", 0)),
                   keep_checkpoints=int(training.get("keep_checkpoints", 3)),
                   keep_period=training.get("keep_period", None) or None,
                   save_initial=bool(training.get("save_initial_checkpoint", False)),
                   preemption_sync_every=int(training.get("preemption_sync_every", 10)))


def open_checkpointer(workdir: Path, schedule: Schedule, async_save: bool = True) -> Checkpointer:
    return Checkpointer(Path(workdir) / CHECKPOINT_DIR, max_to_keep=schedule.keep_checkpoints,
                        save_interval_steps=schedule.checkpoint_every, keep_period=schedule.keep_period,
                        async_save=async_save)


def restore_or_init(checkpointer: Checkpointer, init_fn: Callable[..., Any], mesh: Mesh, rules: Rules,
                    init_args: tuple[Any, ...], data_iter: Any = None) -> tuple[Any, Any, int]:
    """(state, shardings, step): the workdir's latest checkpoint when there is one (data position included), else
    a fresh state at step 0."""
    latest = checkpointer.latest_step()
    if latest is None:
        state, shardings = init_state(init_fn, mesh, rules, *init_args)
        return state, shardings, 0
    target, shardings = state_shardings(init_fn, mesh, rules, *init_args)
    restored = checkpointer.restore(target, step=latest, data_iter=data_iter)
    log.info("resumed from step %d of %s", latest, checkpointer.directory)
    return restored.state, shardings, latest


@dataclasses.dataclass
class LoopResult:
    step: int
    preempted: bool
    last_metrics: dict[str, float] | None


def run(*, state: Any, step_fn: Callable[[Any, Any], tuple[Any, Any]], batches: Iterator[Mapping[str, Any]],
        start_step: int, schedule: Schedule, checkpointer: Checkpointer, logger: MetricLogger, mesh: Mesh,
        rules: Rules, config: Any = None, data_iter: Any = None,
        demo_fn: Callable[[int, Any], None] | None = None, preemption: Preemption | None = None,
        on_state: Callable[[int, Any], None] | None = None, global_batch_size: int | None = None,
        device_batch: Callable[[Mapping[str, Any]], Mapping[str, Any]] = None) -> tuple[Any, LoopResult]:
    """Runs steps start_step+1 .. schedule.num_steps (see the module docstring); returns (state, result).

    `step_fn` is already compiled (`compile_step`, `StepPrograms`). `batches` yields this process's rows of each
    global batch (`sharding.process_batch_rows`); `device_batch` picks what of a host batch goes to the devices;
    `global_batch_size` is the global batch size (needed when processes hold replicated rows).
    `data_iter` is the object whose position is checkpointed (usually the same Grain iterator as `batches`).
    `preemption`: pass one created early so a SIGTERM during compilation is caught too (default: one made here).
    `on_state(step, state)` is called after each step (tests).
    """
    own_preemption = preemption is None
    preemption = preemption or Preemption(sync_every=schedule.preemption_sync_every)
    step = start_step
    preempted = False
    last = None
    try:
        if step == 0 and schedule.save_initial:
            checkpointer.save(0, state, data_iter=data_iter, config=config, force=True)
        while step < schedule.num_steps:
            if preemption.requested(step):
                preempted = True
                break
            host_batch = next(batches)
            batch = shard_batch((device_batch or device_arrays)(host_batch), mesh, rules, global_batch_size)
            state, metrics = step_fn(state, batch)
            step += 1
            last = logger.push(step, metrics) or last
            checkpointer.save(step, state, data_iter=data_iter, config=config)
            if demo_fn is not None and schedule.demo_every and step % schedule.demo_every == 0:
                demo_fn(step, state)
            if on_state is not None:
                on_state(step, state)
        last = logger.flush() or last
        if step not in checkpointer.all_steps():
            checkpointer.save(step, state, data_iter=data_iter, config=config, force=True)
        checkpointer.wait_until_finished()
    finally:
        if own_preemption:
            preemption.close()
    if preempted:
        log.warning("stopped for preemption at step %d; the checkpoint is saved, rerun the same command to resume",
                    step)
    return state, LoopResult(step=step, preempted=preempted, last_metrics=last)

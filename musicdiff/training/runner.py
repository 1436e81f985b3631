"""The stage runner: one training stage for every registered trainer (training/trainer.py).

    python -m launch.train_diffusion --config=configs/diffusion.py:tiny --config.data.latents=DIR --workdir=RUN
    (launch.train_autoencoder and launch.train_evaluator run the same function; `config.trainer` picks the trainer)

`train(config, workdir)`: SIGTERM is caught from start-up; the mesh spans every process's devices; the trainer's
state is restored from WORKDIR/checkpoints (data position included) or initialised sharded, then loaded from
`config.init_from` on a fresh run; one program per step kind is compiled in the mesh's sharding context; the loop
runs with checkpoints, metrics (metrics.jsonl, TensorBoard, progress bar), the NaN guard, demos and preemption.
Multi-host: every process runs it on the same (shared) workdir after jax.distributed is up (launch.common).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections

from musicdiff.checkpoints import find_checkpoint
from musicdiff.metrics import MetricLogger, NanGuard
from musicdiff.parallel.mesh import mesh_and_rules
from musicdiff.parallel.sharding import sharding_context
from musicdiff.training import loop
from musicdiff.training.trainer import Trainer, make_trainer

log = logging.getLogger(__name__)
DEFAULT_MAX_SKIPPED = 20


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, default_trainer: str = "",
          on_state: Callable[[int, Any], None] | None = None) -> Any:
    """Runs the trainer `config.trainer` names (`default_trainer` when the config names none); returns what its
    `finish` returns (default: loop.LoopResult)."""
    workdir = Path(workdir)
    trainer = make_trainer(config, default_trainer)
    trainer.config = config = trainer.prepare(workdir)
    schedule = loop.Schedule.from_config(config.training)
    with loop.Preemption(sync_every=schedule.preemption_sync_every) as preemption:
        state, result = _run(trainer, workdir, schedule, preemption, on_state)
    return trainer.finish(state, result, workdir)


def _run(trainer: Trainer, workdir: Path, schedule: loop.Schedule, preemption: loop.Preemption,
         on_state: Callable[[int, Any], None] | None) -> tuple[Any, loop.LoopResult]:
    config = trainer.config
    mesh, rules = mesh_and_rules(config)
    data_iter = trainer.dataset(mesh, rules)
    key = jax.random.key(int(config.seed))
    with sharding_context(mesh, rules), loop.open_checkpointer(workdir, schedule) as checkpointer:
        fresh = checkpointer.latest_step() is None
        state, shardings, start = loop.restore_or_init(checkpointer, trainer.init_state, mesh, rules, (key,),
                                                       data_iter=data_iter)
        if fresh and config.get("init_from", ""):
            ref = find_checkpoint(str(config.init_from))
            state = trainer.load_weights(state, shardings, ref)
            log.info("initialised the weights from %s (step %d)", ref.step_dir, ref.step)
        spec = trainer.batch_spec(mesh, rules)
        step_fn = loop.StepPrograms(trainer.step_kinds(), trainer.step, trainer.step_kind, shardings,
                                    loop.batch_shardings(spec, mesh, rules), mesh, rules, start_step=start)
        guard = NanGuard(int(config.training.get("max_nonfinite_steps", DEFAULT_MAX_SKIPPED)),
                         keys=trainer.guarded_metrics)
        with MetricLogger(workdir, total_steps=schedule.num_steps, initial_step=start, log_every=schedule.log_every,
                          nan_guard=guard, per_step=trainer.throughput(spec)) as logger:
            demo = trainer.demo(workdir, logger, mesh, rules) if schedule.demo_every else None
            return loop.run(state=state, step_fn=step_fn, batches=data_iter, start_step=start, schedule=schedule,
                            checkpointer=checkpointer, logger=logger, mesh=mesh, rules=rules, config=config,
                            data_iter=data_iter, demo_fn=demo, on_state=on_state, preemption=preemption,
                            global_batch_size=int(config.batch_size), device_batch=trainer.device_batch)


__all__ = ["train"]

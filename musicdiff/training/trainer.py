"""The trainer contract: what one kind of training defines. The stage runner (training/runner.py) does the rest.

A trainer is a class registered by name (`@register_trainer("diffusion")`) and chosen by `config.trainer`. It says
- its data: `dataset(mesh, rules)`, a checkpointable (Grain) iterator of this process's rows of every global batch,
  and `batch_spec(...)`, arrays shaped like one device batch of this process;
- its state: `init_state(key)`, a pure function (the runner jit's it straight into the shardings the logical names
  give), and `load_weights(state, shardings, ref)` for `config.init_from` (default: every params/<section> from
  the checkpoint's EMA when it has one, else its params; the EMA restarts at the loaded weights; sections or
  parameters the checkpoint lacks stay fresh when `freezing` trains them, e.g. new adapters on a base model);
- which parameters train: `freezing` (training/optim.Freezing: class defaults + `training.trainable/frozen`);
- its steps: `step(kind)`, a pure `(state, batch) -> (state, metrics)` for each of `step_kinds()`; the runner
  compiles one program per kind and picks `step_kind(step)` on the host (alternating generator/discriminator steps,
  a distillation schedule); one kind ("train") by default. A step that skips its update (non-finite loss or
  gradients) reports `update_skipped` = 1 (metrics.SKIPPED_METRIC); the runner's NaN guard stops the run after
  `training.max_nonfinite_steps` such steps in a row;
- its hooks: `prepare(workdir)` (resolve the config, write workdir files), `throughput(batch_spec)` (per-step
  amounts for tokens/s and MFU), `demo(...)` (previews every `training.demo_every` steps) and `finish(...)`.

A new trainer (distillation with a frozen teacher, adversarial post-training with alternating steps, adapter training
on a frozen base) is one registered class and a config; the loop, checkpoints, sharding, preemption and metrics are
the runner's.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from musicdiff.checkpoints import CheckpointRef, path_name, restore_params_only
from musicdiff.errors import ConfigError
from musicdiff.metrics import MetricLogger
from musicdiff.parallel.sharding import Rules
from musicdiff.training.loop import device_arrays
from musicdiff.training.optim import Freezing

StepFn = Callable[[Any, Mapping[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
DemoFn = Callable[[int, Any], None]
TRAIN = "train"

_TRAINERS: dict[str, type[Trainer]] = {}


def register_trainer(name: str) -> Callable[[type[Trainer]], type[Trainer]]:
    def wrap(cls: type[Trainer]) -> type[Trainer]:
        cls.name = name
        _TRAINERS[name] = cls
        return cls

    return wrap


def trainer_names() -> list[str]:
    _load_builtin_trainers()
    return sorted(_TRAINERS)


def _load_builtin_trainers() -> None:
    # Importing a trainer module registers it.
    from musicdiff.training import autoencoder, diffusion, evaluator, lora  # noqa: F401


def make_trainer(config: ml_collections.ConfigDict, default: str = "") -> Trainer:
    name = config.get("trainer", "") or default
    if name not in _TRAINERS:
        _load_builtin_trainers()
    if name not in _TRAINERS:
        raise ConfigError(f"config.trainer={name!r}: no such trainer; registered: {', '.join(sorted(_TRAINERS))}")
    return _TRAINERS[name](config)


class Trainer(abc.ABC):
    """See the module docstring."""

    name: ClassVar[str] = ""
    # Glob patterns over parameter names (inside params/) this trainer trains / freezes by default.
    trainable_patterns: ClassVar[tuple[str, ...]] = ()
    frozen_patterns: ClassVar[tuple[str, ...]] = ()
    # Metrics that must be finite (the NaN guard also counts every reported `update_skipped`).
    guarded_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    # Sections of params/ that config.init_from may lack (they then start fresh), e.g. a GAN's discriminator.
    optional_sections: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.freezing = Freezing.from_config(config.training, self.trainable_patterns, self.frozen_patterns)

    # ---- set-up and data ------------------------------------------------------------------------------------

    def prepare(self, workdir: Path) -> ml_collections.ConfigDict:
        """The config the run uses (resolved against its data), after writing what the workdir needs. Runs on
        every process; writes belong to process 0 (parallel.distributed.on_main_process)."""
        return self.config

    @abc.abstractmethod
    def dataset(self, mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[Mapping[str, Any]]:
        """This process's rows of every global batch, as a checkpointable iterator (its position is saved)."""

    @abc.abstractmethod
    def batch_spec(self, mesh: jax.sharding.Mesh, rules: Rules) -> Mapping[str, np.ndarray]:
        """Arrays shaped like one device batch of this process (what `device_batch` returns)."""

    def device_batch(self, host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays of a host batch that go to the devices (strings such as captions stay on the host)."""
        return device_arrays(host_batch)

    # ---- state ------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def init_state(self, key: jax.Array) -> Any:
        """A fresh train state (pure; a dict with params/<section>, optionally ema/<section>, opt_state, step...)."""

    def load_weights(self, state: Any, shardings: Any, ref: CheckpointRef) -> Any:
        """`state` with the weights of checkpoint `ref` (config.init_from); optimiser, step and data stay fresh."""
        params = dict(state["params"])
        for section, fresh in state["params"].items():
            source = next((f"{kind}/{section}" for kind in ("ema", "params") if ref.has_subtree(f"{kind}/{section}")),
                          None)
            if source is None:
                if section in self.optional_sections or self._trains_all(section, fresh):
                    continue  # not in the checkpoint: this run starts it fresh
                raise ConfigError(f"config.init_from={ref.step_dir}: holds no '{section}' weights (no "
                                  f"params/{section}/ or ema/{section}/ arrays)")
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), fresh,
                                  shardings["params"][section])
            new_here = (lambda name, section=section: not self.freezing.is_frozen(f"{section}/{name}")) \
                if self.freezing.active else None
            params[section] = restore_params_only(ref.step_dir, target, subtree=source, fresh=fresh,
                                                  missing_ok=new_here)
        new = {**state, "params": params}
        if "ema" in state:
            new["ema"] = {**state["ema"], **{name: jax.tree.map(jnp.copy, params[name]) for name in state["ema"]}}
        return new

    def _trains_all(self, section: str, params: Any) -> bool:
        """Whether the freezing patterns train every parameter of `section` (a part this run adds)."""
        names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        return self.freezing.active and not any(self.freezing.is_frozen(f"{section}/{name}") for name in names)

    # ---- steps ------------------------------------------------------------------------------------------------

    def step_kinds(self) -> tuple[Hashable, ...]:
        """The kinds of step that steps 0 .. num_steps-1 use (one compiled program each)."""
        return (TRAIN,)

    def step_kind(self, step: int) -> Hashable:
        """The kind of global step `step` (0-based), chosen on the host."""
        return TRAIN

    @abc.abstractmethod
    def step(self, kind: Hashable) -> StepFn:
        """The pure step for steps of `kind`."""

    # ---- hooks ------------------------------------------------------------------------------------------------

    def throughput(self, batch_spec: Mapping[str, np.ndarray]) -> dict[str, float]:
        """{name: amount per step}: MetricLogger logs name = amount x steps/s (tokens_per_sec, mfu, ...)."""
        return {}

    def demo(self, workdir: Path, logger: MetricLogger, mesh: jax.sharding.Mesh, rules: Rules) -> DemoFn | None:
        """A preview run every `training.demo_every` steps with (step, state), or None."""
        return None

    def finish(self, state: Any, result: Any, workdir: Path) -> Any:
        """What the stage returns once the loop ended (default: the loop's result)."""
        return result


__all__ = ["TRAIN", "DemoFn", "StepFn", "Trainer", "make_trainer", "register_trainer", "trainer_names"]

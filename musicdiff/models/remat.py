"""Activation checkpointing of an nnx sub-module as a pure function.

`nnx.remat` re-enters the module's graph and writes its state back, which fails with a TraceContextError when the
module was built at another trace level, e.g. merged from params outside a sampler's `lax.fori_loop` or a chunked
decoder's `lax.map` and called inside it. Splitting the module into (graphdef, state) and checkpointing a function of
the state alone reads the outer values without mutating anything, under any transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def checkpointed(fn: Callable[..., Any], module: Any, *args: Any, policy: Callable | None = None) -> Any:
    """`fn(module, *args)` with its activations recomputed in the backward pass (jax.checkpoint with `policy`).
    `module` is an nnx Module or a tuple of them (None entries allowed)."""
    graphdef, state = nnx.split(module)

    def pure(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return jax.checkpoint(pure, policy=policy)(state, *args)

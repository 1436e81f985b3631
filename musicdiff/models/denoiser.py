"""The denoiser protocol: what training, sampling and guidance may assume about a diffusion model.

    model(x [B, C, L], t [B], cond: ConditioningInputs | None = None, **extras) -> [B, C, L]

`t` is the model time of the training objective (diffusion/objectives.py); `cond` is the MultiConditioner's output.
Extras are keyword inputs a denoiser may accept for its extension points; the transformer denoisers take
- `block_residuals`: per-block residuals added to the hidden state after each block (what a ControlNet's copy adds);
- `adapter_inputs`: a dict handed to every per-block adapter module (decoupled cross-attention adapters and the
  like, models/block_adapters.py), whose parameters live in their own subtree;
- `local_cond`: [B, D, L] features time-aligned with x, added in every block (LOCAL_CONDITIONING below); for
  inpainting D = C + 1: concat([keep mask [B, 1, L] (1 = provided context, 0 = generate), x0 · mask], channels);
- `padding_mask`: [B, L] bool, True = a real latent frame (variable-length batches, spec §3.4). A denoiser declaring
  PADDING_MASK guarantees that its outputs at real frames do not depend on the inputs at padded frames; outputs at
  padded frames are unspecified. Callers pass it only to denoisers that declare the capability, so plain callables
  `model(x, t, cond)` keep working.

What a denoiser can do is declared, not inferred from its class:
- `capabilities`: a frozenset of the names below;
- `forward_flops(batch, length, cond_tokens)`: matmul FLOPs of one forward pass, for MFU.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

IMPLICIT_NULL_CONTEXT = "implicit_null_context"
"""cond.cross_tokens may have fewer rows than x; the rows past them get the null context (zero tokens) and skip
their cross-attention. Classifier-free guidance then passes only the conditional half's tokens."""
BLOCK_RESIDUALS = "block_residuals"
"""Accepts `block_residuals=` (ControlNet-style per-block residuals)."""
BLOCK_ADAPTERS = "block_adapters"
"""Has per-block adapter modules in their own parameter subtree and accepts `adapter_inputs=`."""
LOCAL_CONDITIONING = "local_conditioning"
"""Accepts `local_cond=` [B, D, L] (Stable Audio 3's additive local conditioning, spec §3.2 step 8: the inpainting /
continuation input). None or absent = all zeros = text-to-audio. Models without it take no such input, and
generation falls back to RePaint-style inpainting for them."""
PADDING_MASK = "padding_mask"
"""Accepts `padding_mask=` [B, L] (True = a real frame): padded frames are kept out of self-attention's keys and
their inputs cannot reach the real frames' outputs."""


class ConditioningInputs(NamedTuple):
    """What the denoiser receives: cross-attention tokens [B, S, D], their mask [B, S] bool, global embedding [B, G]
    (None when no global conditions are routed), and features concatenated to its input channels [B, F, L] (None when
    none are routed; a denoiser built for them takes None as the hidden, all-zero condition)."""

    cross_tokens: jax.Array
    cross_mask: jax.Array
    global_embed: jax.Array | None
    input_concat: jax.Array | None = None


@runtime_checkable
class Denoiser(Protocol):
    capabilities: frozenset[str]

    def __call__(self, x: jax.Array, t: jax.Array, cond: ConditioningInputs | None = None,
                 **extras: Any) -> jax.Array: ...

    def forward_flops(self, batch: int, length: int, cond_tokens: int) -> int: ...


def capabilities(model: Any) -> frozenset[str]:
    """The capabilities a model declares (none for plain callables)."""
    return frozenset(getattr(model, "capabilities", frozenset()))


def train_flops(model: Denoiser, batch: int, length: int, cond_tokens: int) -> int:
    """FLOPs of one training step for MFU: 3 x forward (the backward pass is two matmuls per forward matmul: the
    gradients with respect to activations and to weights). Remat recomputation is not counted (that would be HFU)."""
    return 3 * model.forward_flops(batch, length, cond_tokens)


__all__ = ["BLOCK_ADAPTERS", "BLOCK_RESIDUALS", "IMPLICIT_NULL_CONTEXT", "LOCAL_CONDITIONING", "PADDING_MASK",
           "ConditioningInputs",
           "Denoiser", "capabilities", "train_flops"]

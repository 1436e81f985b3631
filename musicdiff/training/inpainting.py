"""Inpainting / continuation-conditioned diffusion training (Stable Audio 3, spec §5), used by the diffusion trainer.

Active when `config.model.local_cond_dim` > 0 and the config has an `inpainting` section. Per sample a mask type
(full / causal / spans / segments, diffusion/inpainting_masks.py) is drawn with `inpainting.mask_probabilities`; the
keep mask m [B, L] (1 = provided context, 0 = generate; never context over padding frames, `padding_mask`) gives the
denoiser's `local_cond` = concat([m, x0 · m], channels) [B, C + 1, L] (so local_cond_dim must be io_channels + 1).

Loss: the objective's loss over the generated region, m == 0 (and the valid frames when objective.mask_padding),
plus, with `inpainting.context_loss_weight` w > 0, w times the batch mean, over samples that have context, of each
sample's mean squared error over its context frames m == 1 (SA3's mask_loss_weight term: the model also reproduces
what it was given). A "full" mask is text-to-audio: an all-zero local input and the plain loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from musicdiff.diffusion.inpainting_masks import MASK_TYPES, mask_probabilities, sample_masks
from musicdiff.errors import ConfigError

MASK_STREAM = 0x1A9A  # fold_in tag of the mask key: the step's other draws (t, noise, dropout) stay as without it


@dataclasses.dataclass(frozen=True)
class InpaintingTraining:
    probabilities: tuple[float, ...]  # in MASK_TYPES order, normalised
    context_loss_weight: float = 0.0


def inpainting_training(config: ml_collections.ConfigDict) -> InpaintingTraining | None:
    """The run's inpainting settings, or None when it trains without the input. Raises ConfigError naming the key."""
    dim = int(config.model.get("local_cond_dim", 0))
    section = config.get("inpainting")
    if not dim or section is None:
        return None
    channels = int(config.model.io_channels)
    if dim != channels + 1:
        raise ConfigError(f"config.model.local_cond_dim={dim}: the inpainting input is the keep mask plus the "
                          f"{channels} latent channels (config.model.io_channels); set "
                          f"--config.model.local_cond_dim={channels + 1}, or 0 to train without it")
    raw = section.get("mask_probabilities", {})
    try:
        named = isinstance(raw, (Mapping, ml_collections.ConfigDict))
        probabilities = mask_probabilities(dict(raw.items()) if named else list(raw))
    except ValueError as err:
        raise ConfigError(f"config.inpainting.mask_probabilities: {err}; e.g. "
                          f"--config.inpainting.mask_probabilities.full=1.0 for text-to-audio only") from None
    weight = float(section.get("context_loss_weight", 0.0))
    if weight < 0:
        raise ConfigError(f"config.inpainting.context_loss_weight={weight}: must be 0 (generated region only) or more")
    return InpaintingTraining(tuple(float(p) for p in probabilities), weight)


def local_condition(key: jax.Array, x0: jax.Array, valid: jax.Array | None,
                    settings: InpaintingTraining) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(local_cond [B, C + 1, L], keep mask [B, L], mask types [B]) for latents x0 [B, C, L]."""
    batch, _, length = x0.shape
    keep, types = sample_masks(key, batch, length, jnp.asarray(settings.probabilities), valid)
    keep = keep.astype(x0.dtype)
    return jnp.concatenate([keep[:, None], x0 * keep[:, None]], axis=1), keep, types


def inpainting_loss(objective: Any, output: jax.Array, target: jax.Array, keep: jax.Array, valid: jax.Array | None,
                    context_loss_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics): the objective's loss over the generated frames (keep == 0, valid), plus the weighted
    per-sample context loss (module docstring)."""
    valid = jnp.ones_like(keep) if valid is None else valid.astype(keep.dtype)
    generated = (1.0 - keep) * valid
    loss = objective.loss(output, target, generated)
    metrics = {"inpaint_generated_fraction": jnp.sum(generated) / jnp.maximum(jnp.sum(valid), 1.0)}
    if context_loss_weight > 0:
        context = keep * valid
        err = jnp.mean(jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32)), axis=1)  # [B, L]
        frames = jnp.sum(context, axis=1)
        per_sample = jnp.sum(err * context, axis=1) / jnp.maximum(frames, 1.0)
        has_context = (frames > 0).astype(jnp.float32)
        context_loss = jnp.sum(per_sample * has_context) / jnp.maximum(jnp.sum(has_context), 1.0)
        metrics["inpaint_context_loss"] = context_loss
        loss = loss + context_loss_weight * context_loss
    return loss, metrics


def mask_type_fractions(types: jax.Array) -> dict[str, jax.Array]:
    """The batch's share of each mask type, for the step metrics."""
    return {f"inpaint_{name}": jnp.mean((types == index).astype(jnp.float32)) for index, name in enumerate(MASK_TYPES)}


__all__ = ["MASK_STREAM", "InpaintingTraining", "inpainting_loss", "inpainting_training", "local_condition",
           "mask_type_fractions"]

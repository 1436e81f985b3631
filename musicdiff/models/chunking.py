"""Chunked encode / decode of long audio with the Oobleck autoencoder, bounded in activation memory.

Like the reference's chunked pretransform (spec §1.6), chunk size and overlap count latent frames (defaults 128 / 32).
The signal is cut into windows of `chunk_frames` latent frames (`chunk_frames · ratio` samples for the encoder) that
start every `chunk_frames − overlap_frames` frames; the last window is moved back to end exactly at the signal's end
rather than zero-padded, because zero latents (or zero audio) past the end are not what the unchunked model sees:
its convolutions zero-pad every layer's activations, not the input. All windows therefore have one shape and go
through one compiled program, one at a time (`lax.map`). Neighbouring windows are stitched at the middle of their
overlap, so every kept frame is at least `overlap_frames // 2` frames from a window edge it does not share with the
full signal.

Tolerance: a kept output frame depends only on inputs within the model's receptive radius (`receptive_radius_frames`,
an upper bound computed from the layer list: 11 latent frames for SAO's decoder and 9 for its encoder). When
`overlap_frames // 2` is at least that radius, every kept frame sees exactly the inputs it sees in the unchunked pass,
so chunked and unchunked outputs agree up to float32 rounding (convolutions of different lengths may accumulate in a
different order), i.e. to ~1e-5 of the signal's peak. Smaller overlaps truncate the context and give audible seams.
The encoder's pre-bottleneck output is stitched and the bottleneck is applied once to the whole, so VAE sampling and
KL are those of the whole signal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from musicdiff.models.autoencoder import OobleckAutoencoder, OobleckConfig, pad_to_multiple
from musicdiff.models.oobleck_layers import RESIDUAL_DILATIONS

RESIDUAL_KERNEL = 7


def _residual_radius_steps() -> float:
    """Reach, in steps of the layer's own rate, of three residual units (k7 dilated 1, 3, 9, then k1) each side."""
    return sum((RESIDUAL_KERNEL - 1) * d / 2 for d in RESIDUAL_DILATIONS)


def receptive_radius_frames(config: OobleckConfig, part: str) -> int:
    """Upper bound, in latent frames, on how far an output of the encoder or decoder reaches into its input.

    A layer running at `rate` samples per step with kernel k and dilation d reaches (k − 1)·d/2 steps each side;
    strided and transposed convolutions (kernel 2s) are counted with their whole kernel as a safe bound.
    """
    ratio = config.downsampling_ratio
    if part == "encoder":
        reach, rate = 3.0, 1  # samples; first conv k7
        for stride in config.strides:
            reach += (_residual_radius_steps() + 2 * stride) * rate
            rate *= stride
        reach += 1.0 * rate  # last conv k3 at the latent rate
        return int(-(-reach // ratio))
    if part == "decoder":
        reach, steps_per_frame = 3.0, 1  # latent frames; first conv k7
        for stride in reversed(config.strides):
            reach += 2.0 / steps_per_frame  # a transposed conv output sees two input steps
            steps_per_frame *= stride
            reach += _residual_radius_steps() / steps_per_frame
        reach += 3.0 / steps_per_frame  # last conv k7 at the audio rate
        return int(-(-reach // 1))
    raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")


def plan_chunks(total_frames: int, chunk_frames: int, overlap_frames: int) -> list[tuple[int, int, int]]:
    """Windows as (start, keep_from, keep_to) in latent frames; the kept ranges tile [0, total_frames)."""
    if not 0 <= overlap_frames < chunk_frames:
        raise ValueError(f"need 0 <= overlap_frames < chunk_frames, got overlap {overlap_frames}, "
                         f"chunk {chunk_frames}")
    if total_frames <= chunk_frames:
        return [(0, 0, total_frames)]
    hop = chunk_frames - overlap_frames
    starts = list(range(0, total_frames - chunk_frames, hop)) + [total_frames - chunk_frames]
    # Stitch at the middle of each overlap (the last overlap can be longer than overlap_frames).
    cuts = [(nxt + prev + chunk_frames) // 2 for prev, nxt in zip(starts[:-1], starts[1:])]
    bounds = [0] + cuts + [total_frames]
    return [(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def run_windows(apply, x: jax.Array, plan: list[tuple[int, int, int]], chunk_frames: int, in_rate: int,
                 out_rate: int) -> jax.Array:
    """Applies `apply` (NWC → NWC) to every planned window of `x` and stitches the kept ranges along time.

    `in_rate` / `out_rate`: samples per latent frame of the input and output (ratio or 1).
    """
    if len(plan) == 1:
        return apply(x)
    windows = jnp.stack([x[:, s * in_rate:(s + chunk_frames) * in_rate] for s, _, _ in plan])
    outputs = jax.lax.map(apply, windows)  # one window at a time, one compiled shape
    if outputs.shape[2] != chunk_frames * out_rate:
        raise ValueError(f"a window of {chunk_frames} frames gave {outputs.shape[2]} steps, not "
                         f"{chunk_frames * out_rate}; chunking needs even strides")
    pieces = [outputs[i, :, (lo - s) * out_rate:(hi - s) * out_rate] for i, (s, lo, hi) in enumerate(plan)]
    return jnp.concatenate(pieces, axis=1)


@functools.partial(nnx.jit, static_argnames=("chunk_frames", "overlap_frames", "sample", "planner"))
def chunked_encode(model: OobleckAutoencoder, audio: jax.Array, rng: jax.Array | None = None, *,
                   chunk_frames: int = 128, overlap_frames: int = 32, sample: bool = False,
                   planner=plan_chunks) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`model.encode` (any autoencoder with `encode_features` and a bottleneck) for long audio `[B, in_channels, T]`
    → (latents `[B, latent_dim, ceil(T / ratio)]`, info). The bottleneck acts per frame, so it runs once on the
    stitched features."""
    features = chunked_encode_features(model, audio, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                                       planner=planner)
    latents, info = model.bottleneck.encode(features, rng=rng, sample=sample)
    return jnp.swapaxes(latents, 1, 2), info


def chunked_encode_features(model: OobleckAutoencoder, audio: jax.Array, *, chunk_frames: int = 128,
                            overlap_frames: int = 32, planner=plan_chunks) -> jax.Array:
    """Pre-bottleneck features `[B, ceil(T / ratio), encoder_out_channels]` (NWC) of audio `[B, in_channels, T]`,
    stitched from the windows of `planner(frames, chunk_frames, overlap_frames)` (call it inside jit;
    `chunked_encode` is this plus the bottleneck)."""
    model._check_audio(audio)
    ratio = model.downsampling_ratio
    audio_nwc = jnp.swapaxes(pad_to_multiple(audio, ratio), 1, 2)
    plan = planner(audio_nwc.shape[1] // ratio, chunk_frames, overlap_frames)
    return run_windows(model.encode_features, audio_nwc, plan, chunk_frames, ratio, 1)


@functools.partial(nnx.jit, static_argnames=("chunk_frames", "overlap_frames", "planner"))
def chunked_decode(model: OobleckAutoencoder, latents: jax.Array, *, chunk_frames: int = 128,
                   overlap_frames: int = 32, planner=plan_chunks) -> jax.Array:
    """`model.decode` (any autoencoder with `decode_nwc`) for long latents `[B, latent_dim, F]` → audio
    `[B, out_channels, F · ratio]`, windowed by `planner(frames, chunk_frames, overlap_frames)`."""
    if latents.ndim != 3 or latents.shape[1] != model.config.latent_dim:
        raise ValueError(f"chunked_decode expects latents [batch, {model.config.latent_dim}, frames], "
                         f"got {latents.shape}")
    plan = planner(latents.shape[2], chunk_frames, overlap_frames)
    audio = run_windows(model.decode_nwc, jnp.swapaxes(latents, 1, 2), plan, chunk_frames, 1,
                         model.downsampling_ratio)
    return jnp.swapaxes(audio, 1, 2)

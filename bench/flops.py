"""Analytic FLOPs of the benchmark rows (2 FLOPs per multiply-add; activations, norms and softmax not counted).

The DiT counts come from musicdiff.models.dit (dit_forward_flops / dit_train_flops). The Oobleck autoencoder is
counted here by walking its layer list: a Conv1d with kernel k from C_in to C_out costs 2·k·C_in·C_out per output
step; a ConvTranspose1d (stride s) costs 2·k·C_in·C_out per input step, which is what a polyphase or a
zero-skipping implementation does (a naive zero-inserted input would do s times more, and is not counted).
The "nearest" decoder upsampler is counted as its conv at the repeated rate.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from musicdiff.models.autoencoder import OobleckAutoencoder
from musicdiff.models.oobleck_layers import NearestUpsample1d, WNConv1d, WNConvTranspose1d


def _conv_output_length(conv: WNConv1d, length: int) -> int:
    kernel = conv.weight_v.shape[0]
    return (length + sum(conv.padding) - conv.dilation * (kernel - 1) - 1) // conv.stride + 1


def _walk(module: Any, length: int) -> tuple[int, int]:
    """(FLOPs, output length) of `module` on an input of `length` steps; residual units keep the length."""
    if isinstance(module, WNConv1d):
        kernel, c_in, c_out = module.weight_v.shape
        out = _conv_output_length(module, length)
        return 2 * kernel * c_in * c_out * out, out
    if isinstance(module, WNConvTranspose1d):
        kernel, c_in, c_out = module.weight_v.shape
        return 2 * kernel * c_in * c_out * length, module.output_length(length)
    if isinstance(module, NearestUpsample1d):  # the conv runs at the repeated rate
        return _walk(module.conv, length * module.stride)
    layers = getattr(module, "layers", None)
    if layers is None:  # activations
        return 0, length
    total, current = 0, length
    for layer in layers:
        flops, current = _walk(layer, current)
        total += flops
    return total, current


def abstract_autoencoder(section) -> OobleckAutoencoder:
    """The autoencoder of a config section with shapes only (nothing is initialised)."""
    from musicdiff.models import registry

    return nnx.eval_shape(lambda: registry.build(section, nnx.Rngs(0)))


def oobleck_encode_flops(model: OobleckAutoencoder, samples: int, batch: int = 1) -> int:
    """Convolution FLOPs of `model.encode` on `batch` clips of `samples` samples (padded to the ratio)."""
    ratio = model.downsampling_ratio
    padded = -(-samples // ratio) * ratio
    return batch * _walk(model.encoder, padded)[0]


def oobleck_decode_flops(model: OobleckAutoencoder, frames: int, batch: int = 1) -> int:
    """Convolution FLOPs of `model.decode` on `batch` latent sequences of `frames` frames."""
    return batch * _walk(model.decoder, frames)[0]


def same_decode_flops(model, frames: int, batch: int = 1) -> int:
    """Matmul FLOPs of `SAMEAutoencoder.decode` (musicdiff/models/same.py) on `batch` sequences of `frames` latent
    frames: the latent -> width Linear, then the decoder TRB (frames padded to whole chunks, each followed by `stride`
    new tokens) whose blocks run on chunks of chunk_size + chunk_size / stride tokens (the midpoint-shifted second
    half on one chunk more), then the weight-normed conv mapping to the patches. Chunked attention only (SAME-S)."""
    config = model.config
    if config.attention != "chunked":
        raise ValueError(f"same_decode_flops counts chunked attention; this SAME has {config.attention!r}")
    width, stride = config.width, config.stride
    chunk = config.chunk_size + config.chunk_size // stride  # tokens per attention chunk
    padded = -(-frames // (config.chunk_size // stride)) * (config.chunk_size // stride)
    tokens = padded * (stride + 1)
    maps = 2 if config.differential else 1
    parts = 2 * maps + 1  # to_qkv: q, k (q2, k2), v

    def block(length: int) -> int:
        projections = 2 * length * width * parts * width + 2 * length * width * width
        attention = maps * 4 * length * chunk * width  # q·k and p·v within the token's chunk
        inner = config.ff_mult * width
        return projections + attention + 2 * length * width * 2 * inner + 2 * length * inner * width

    depth, shifted = config.decoder_depth, config.decoder_depth // 2 if config.chunk_midpoint_shift else 0
    blocks = (depth - shifted) * block(tokens) + shifted * block(tokens + chunk)
    mapping = 2 * config.decoder_mapping_kernel * width * config.patch_channels * padded * stride
    return batch * (2 * padded * config.latent_dim * width + blocks + mapping)

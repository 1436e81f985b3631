"""The embedded evaluator: a small audio classifier/embedding network for the synthetic set (model "audio_evaluator").

It gives the offline metrics a backbone that needs no download (musicdiff.eval.backbones.embedded): frame
embeddings for FD, label distributions for KL and attribute predictions for accuracy. Trained by
`launch.train_evaluator` on the embedded set's attributes; ~32 k parameters (default config), so it trains on a
laptop CPU in minutes.

Input: audio [batch, channels, samples] at `sample_rate` (mixed to mono). Two fixed front ends (no parameters):
- a log-frequency spectrogram with one triangular band per semitone, MIDI `min_midi` .. min_midi + 12·octaves - 1
  (starting on a C, so bands fold into pitch classes), from an n_fft STFT; log(1e-6 + power), minus its mean
  (gain invariance);
- an onset envelope (positive log-magnitude flux of an `onset_fft`/`onset_hop` STFT) and its normalised
  autocorrelation over lags up to `max_lag_seconds`: the periodicity evidence the tempo head needs.
Trunk: three 2-D convs over (time, pitch), pitch never pooled, so the trunk is transposition equivariant.
Heads:
- key and mode from a pitch-class map: the time-mean trunk features folded over octaves [12, C] -> Dense(C, 2)
  -> logits [12 tonics, 2 modes]; key = logsumexp over modes, mode = logsumexp over tonics. Each key shares
  the same weights, so every key is learnt from every clip;
- embedding = LayerNorm(Dense(trunk features averaged per octave (register, timbre), their global max, the
  rotation-invariant max over pitch classes, tempo features)) -> GELU, `embed_dim` wide; the instrument
  (multi-label) and tempo-bucket heads read the embedding.
Outputs a dict: embedding [B, embed_dim], logits per head: key [B, 12], mode [B, 2], tempo [B, buckets],
instruments [B, len(instruments)].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicdiff.models.registry import register

KEY_CLASSES = 12
MODE_CLASSES = ("major", "minor")
_CONV_AXES = ("kernel", "kernel", "conv_in", "conv_out")


@functools.lru_cache(maxsize=8)
def semitone_filterbank(sample_rate: int, n_fft: int, min_midi: int, bins: int) -> np.ndarray:
    """[n_fft // 2 + 1, bins] triangular bands centred on semitones, each at least 1.5 FFT bins wide (so low
    bands still catch energy) and normalised to unit area."""
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    centres = 440.0 * 2.0 ** ((np.arange(min_midi, min_midi + bins) - 69) / 12.0)
    half_width = np.maximum(centres * (2 ** (1 / 12) - 1), 1.5 * sample_rate / n_fft)
    weights = np.clip(1.0 - np.abs(freqs[:, None] - centres[None]) / half_width[None], 0.0, None)
    weights /= np.maximum(weights.sum(axis=0, keepdims=True), 1e-12)
    return weights.astype(np.float32)


def _frames(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """[B, T] -> [B, frames, n_fft], centred (n_fft // 2 reflect padding either side)."""
    x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    count = 1 + (x.shape[1] - n_fft) // hop
    index = jnp.arange(count)[:, None] * hop + jnp.arange(n_fft)[None]
    return x[:, index]


def power_spectrum(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
    window = jnp.asarray(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft), jnp.float32)
    spectrum = jnp.fft.rfft(_frames(x, n_fft, hop) * window, axis=-1)
    return jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2


def onset_autocorrelation(x: jax.Array, n_fft: int, hop: int, max_lag: int) -> jax.Array:
    """[B, T] audio -> [B, max_lag] autocorrelation (lags 1..max_lag) of the mean-removed onset envelope / lag 0."""
    log_mag = jnp.log(1e-4 + power_spectrum(x, n_fft, hop)) * 0.5
    flux = jnp.sum(jax.nn.relu(jnp.diff(log_mag, axis=1)), axis=-1)
    flux = flux - jnp.mean(flux, axis=1, keepdims=True)
    length = flux.shape[1]
    size = 1 << math.ceil(math.log2(2 * length))
    spectrum = jnp.fft.rfft(flux, n=size, axis=1)
    corr = jnp.fft.irfft(jnp.abs(spectrum) ** 2, n=size, axis=1)[:, : max_lag + 1]
    return corr[:, 1:] / (corr[:, :1] + 1e-6)


class AudioEvaluator(nnx.Module):
    def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.sample_rate = int(config.sample_rate)
        self.n_fft, self.hop = int(config.n_fft), int(config.hop)
        self.min_midi, self.octaves = int(config.min_midi), int(config.octaves)
        if self.min_midi % 12:
            raise ValueError(f"audio_evaluator: min_midi={self.min_midi} must be a C (a multiple of 12)")
        self.onset_fft, self.onset_hop = int(config.onset_fft), int(config.onset_hop)
        self.max_lag = max(1, int(round(config.max_lag_seconds * self.sample_rate / self.onset_hop)))
        widths = tuple(int(c) for c in config.channels)
        kernels = ((3, 13),) + ((3, 3),) * (len(widths) - 1)  # the first conv spans an octave of semitones
        ins = (1,) + widths[:-1]
        self.convs = nnx.List([
            nnx.Conv(i, o, k, rngs=rngs, kernel_metadata=dict(out_sharding=_CONV_AXES),
                     bias_metadata=dict(out_sharding=("conv_out",)))
            for i, o, k in zip(ins, widths, kernels)])
        top = widths[-1]
        tempo_width = int(config.tempo_features)
        self.tempo_in = nnx.Linear(self.max_lag, tempo_width, rngs=rngs)
        self.tonal = nnx.Linear(top, len(MODE_CLASSES), rngs=rngs)
        # octave-pooled trunk features (register and timbre) + global max + pitch-class max + tempo features
        self.embed = nnx.Linear((self.octaves + 2) * top + tempo_width, int(config.embed_dim), rngs=rngs)
        self.embed_norm = nnx.LayerNorm(int(config.embed_dim), rngs=rngs)
        self.instrument_head = nnx.Linear(int(config.embed_dim), len(config.instruments), rngs=rngs)
        self.tempo_head = nnx.Linear(int(config.embed_dim), len(config.tempo_edges) + 1, rngs=rngs)

    def features(self, audio: jax.Array) -> jax.Array:
        """[B, C, T] or [B, T] audio -> [B, frames, bins] mean-removed log-semitone spectrogram."""
        mono = audio.mean(axis=1) if audio.ndim == 3 else audio
        bank = semitone_filterbank(self.sample_rate, self.n_fft, self.min_midi, 12 * self.octaves)
        spec = jnp.log(1e-6 + power_spectrum(mono, self.n_fft, self.hop) @ jnp.asarray(bank))
        return spec - jnp.mean(spec, axis=(1, 2), keepdims=True)

    def __call__(self, audio: jax.Array) -> dict[str, jax.Array]:
        mono = audio.mean(axis=1) if audio.ndim == 3 else audio
        h = self.features(mono)[..., None]  # [B, frames, bins, 1] (NHWC: time, pitch)
        for index, conv in enumerate(self.convs):
            h = jax.nn.gelu(conv(h))
            if index < len(self.convs) - 1 and h.shape[1] >= 2:
                h = nnx.avg_pool(h, window_shape=(2, 1), strides=(2, 1))  # time only: pitch stays equivariant
        batch, _, bins, width = h.shape
        by_octave = h.mean(axis=1).reshape(batch, self.octaves, 12, width)
        pitch_map = by_octave.sum(axis=1)  # [B, 12, C]
        tonal = self.tonal(pitch_map)  # [B, 12 tonics, 2 modes]
        autocorr = onset_autocorrelation(mono, self.onset_fft, self.onset_hop, self.max_lag)
        tempo_features = jax.nn.gelu(self.tempo_in(autocorr))
        pooled = jnp.concatenate([by_octave.mean(axis=2).reshape(batch, -1), h.max(axis=(1, 2)),
                                  pitch_map.max(axis=1) / self.octaves, tempo_features], axis=-1)
        embedding = jax.nn.gelu(self.embed_norm(self.embed(pooled)))
        return dict(embedding=embedding, key=jax.nn.logsumexp(tonal, axis=2), mode=jax.nn.logsumexp(tonal, axis=1),
                    tempo=self.tempo_head(embedding), instruments=self.instrument_head(embedding))


@register("audio_evaluator")
def build_audio_evaluator(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> AudioEvaluator:
    return AudioEvaluator(config, rngs)

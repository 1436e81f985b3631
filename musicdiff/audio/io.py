"""Reading, resampling, channel policy, level normalisation and atomic writing of audio.

Arrays are float32 `[channels, samples]` everywhere. Decoding is soundfile's (libsndfile: WAV, FLAC, OGG/Vorbis/Opus,
MP3 from libsndfile 1.1), resampling is soxr's "HQ" quality.

Channel policy (`channels=2`): mono is duplicated to both sides; more than two channels are averaged into two, channel
k going to the left side when k is even and to the right when k is odd (the interleaved L/R pairs of quad and most
surround layouts; files carry no layout we could trust more). `channels=1` averages all channels.

Normalisation modes: "none"; "peak" scales the peak to `target_db` dBFS (default -1); "loudness" scales the RMS level
over all channels and samples to `target_db` dBFS (default -20), a simple stand-in for LUFS without K-weighting or
gating, lowered where it would push the peak above -1 dBFS.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import soundfile
import soxr

from musicdiff.files import atomic_path

AudioSource = Union[str, os.PathLike, bytes, BinaryIO]

NORMALIZE_MODES = ("none", "peak", "loudness")
DEFAULT_PEAK_TARGET_DB = -1.0
DEFAULT_LOUDNESS_TARGET_DB = -20.0
_LOUDNESS_PEAK_CEILING_DB = -1.0
_SILENCE_DB = -200.0  # the level reported for all-zero audio
# Output samples read beyond each end of a partial read, so soxr's filter sees real neighbours: 256 keeps a segment
# within float32 rounding of the same span of a whole-file resample.
_RESAMPLE_MARGIN = 256


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def _open(source: AudioSource) -> soundfile.SoundFile:
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    return soundfile.SoundFile(source)


def read_info(source: AudioSource) -> AudioInfo:
    """Header information; raises soundfile.LibsndfileError (a RuntimeError) when the bytes are not readable audio."""
    with _open(source) as f:
        return AudioInfo(f.samplerate, f.channels, f.frames, f.format, f.subtype)


def resampled_length(frames: int, from_rate: int, to_rate: int) -> int:
    """Samples that `frames` samples at `from_rate` become at `to_rate` (rounded half up, in exact integers)."""
    return (2 * frames * to_rate + from_rate) // (2 * from_rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resamples `[channels, samples]` with soxr HQ; the length is exactly `resampled_length(samples, ...)`."""
    audio = np.asarray(audio, dtype=np.float32)
    if from_rate == to_rate:
        return audio
    return _resample_frames(np.ascontiguousarray(audio.T), from_rate, to_rate).T.copy()


def _resample_frames(frames: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resamples `[samples, channels]` (soxr's layout) to exactly `resampled_length` samples."""
    if from_rate == to_rate:
        return frames
    want = resampled_length(len(frames), from_rate, to_rate)
    if len(frames) == 0:
        return np.zeros((0, frames.shape[1]), np.float32)
    out = soxr.resample(frames, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)
    return _fit_length(out, want)


def _fit_length(frames: np.ndarray, length: int) -> np.ndarray:
    if len(frames) >= length:
        return frames[:length]
    return np.concatenate([frames, np.zeros((length - len(frames), frames.shape[1]), frames.dtype)])


def apply_channel_policy(audio: np.ndarray, channels: int) -> np.ndarray:
    """`[c, samples]` to `[channels, samples]` (channels 1 or 2) by the policy in the module docstring."""
    audio = np.asarray(audio, dtype=np.float32)
    return np.ascontiguousarray(_downmix_frames(audio.T, channels).T)


def _downmix_frames(frames: np.ndarray, channels: int) -> np.ndarray:
    """The channel policy on `[samples, c]` (soxr's and soundfile's layout)."""
    if channels not in (1, 2):
        raise ValueError(f"channels={channels}: only 1 (mono) and 2 (stereo) are supported")
    have = frames.shape[1]
    if channels == 1:
        return frames if have == 1 else frames.mean(axis=1, keepdims=True, dtype=np.float32)
    if have == 1:
        return np.repeat(frames, 2, axis=1)
    if have == 2:
        return frames
    left = frames[:, 0::2].mean(axis=1, dtype=np.float32)
    right = frames[:, 1::2].mean(axis=1, dtype=np.float32)
    return np.stack([left, right], axis=1)


def load_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    channels: int | None = 2,
    offset: int = 0,
    num_samples: int | None = None,
) -> np.ndarray:
    """Decodes `[channels, n]` float32 at `sample_rate` (None: the file's rate; channels None: the file's channels).

    `offset` and `num_samples` count samples at the output rate; only the source frames that span them (plus a small
    margin for the resampling filter) are read, so a crop of a long file costs about the crop. `n` is `num_samples`
    unless the file ends first.
    """
    if offset < 0:
        raise ValueError(f"offset={offset} must be >= 0")
    with _open(source) as f:
        from_rate, total = f.samplerate, f.frames
        to_rate = sample_rate or from_rate
        out_total = resampled_length(total, from_rate, to_rate)
        end = out_total if num_samples is None else min(out_total, offset + num_samples)
        end = max(end, offset)
        if from_rate == to_rate:
            frames = _read_frames(f, offset, end - offset)
        else:
            frames = _read_resampled(f, from_rate, to_rate, offset, end)
    if channels is not None:
        frames = _downmix_frames(frames, channels)
    return np.ascontiguousarray(frames.T)


def _read_frames(f: soundfile.SoundFile, start: int, count: int) -> np.ndarray:
    start = min(start, f.frames)
    f.seek(start)
    return f.read(max(0, min(count, f.frames - start)), dtype="float32", always_2d=True)


def _read_resampled(f: soundfile.SoundFile, from_rate: int, to_rate: int, start: int, end: int) -> np.ndarray:
    """Output samples [start, end) at `to_rate`, on the same sample grid as resampling the whole file.

    Reads start on multiples of `from_rate / gcd` source frames, where source and output grids coincide.
    """
    common = math.gcd(from_rate, to_rate)
    step_in, step_out = from_rate // common, to_rate // common
    margin = max(_RESAMPLE_MARGIN, -(-_RESAMPLE_MARGIN * to_rate // from_rate))
    first_block = max(0, start - margin) // step_out
    last_block = -(-(end + margin) // step_out)
    src_start = first_block * step_in
    src_frames = _read_frames(f, src_start, last_block * step_in - src_start)
    if len(src_frames) == 0:
        return np.zeros((end - start, f.channels), np.float32)
    out = _resample_frames(src_frames, from_rate, to_rate)
    out_start = start - first_block * step_out
    return _fit_length(out[out_start:end - first_block * step_out], end - start)


def peak_db(audio: np.ndarray) -> float:
    """Peak absolute sample in dBFS (-200 for silence)."""
    peak = float(np.max(np.abs(audio))) if np.size(audio) else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else _SILENCE_DB


def rms_db(audio: np.ndarray) -> float:
    """RMS over all channels and samples in dBFS (-200 for silence)."""
    mean_square = float(np.mean(np.square(audio, dtype=np.float64))) if np.size(audio) else 0.0
    return 10.0 * math.log10(mean_square) if mean_square > 0 else _SILENCE_DB


def normalization_gain(mode: str, peak: float, rms: float, target_db: float | None = None) -> float:
    """Linear gain that normalises audio whose peak and RMS levels (dBFS) are `peak` and `rms`."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize={mode!r}: choose one of {', '.join(NORMALIZE_MODES)}")
    if mode == "none" or peak <= _SILENCE_DB:
        return 1.0
    if mode == "peak":
        gain_db = (DEFAULT_PEAK_TARGET_DB if target_db is None else target_db) - peak
    else:
        gain_db = (DEFAULT_LOUDNESS_TARGET_DB if target_db is None else target_db) - rms
        gain_db = min(gain_db, _LOUDNESS_PEAK_CEILING_DB - peak)
    return 10.0 ** (gain_db / 20.0)


def normalize(audio: np.ndarray, mode: str, target_db: float | None = None) -> np.ndarray:
    """`audio` scaled by `normalization_gain` of its own levels ("none" returns it unchanged)."""
    gain = normalization_gain(mode, peak_db(audio), rms_db(audio), target_db)
    return audio if gain == 1.0 else (np.asarray(audio, np.float32) * np.float32(gain))


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, subtype: str | None = None) -> Path:
    """Writes `[channels, samples]` (format from the suffix) atomically (musicdiff.files), so readers never see a
    partial file. `subtype` defaults to soundfile's (PCM_16 for WAV and FLAC)."""
    path = Path(path)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    format_name = path.suffix.lstrip(".").upper() or None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        soundfile.write(temporary, audio.T, sample_rate, subtype=subtype, format=format_name)
    return path

"""Log-mel spectrograms as arrays and as PNG images (for the demo, TensorBoard and generated clips)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import librosa
import numpy as np

from musicdiff.files import atomic_path


def log_mel(audio: np.ndarray, sample_rate: int, n_mels: int = 128, n_fft: int = 2048, hop: int = 512,
            floor: float | None = None) -> np.ndarray:
    """Log-mel power in dB of the channel mean of `audio` [channels, samples] or [samples]: relative to its maximum
    (80 dB range) by default, or absolute (10·log10, power floored at `floor`) so that loudness differences show."""
    mono = np.asarray(audio, dtype=np.float32)
    if mono.ndim == 2:
        mono = mono.mean(axis=0)
    mel = librosa.feature.melspectrogram(y=mono, sr=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    if floor is not None:
        return 10.0 * np.log10(np.maximum(mel, floor))
    return librosa.power_to_db(mel, ref=max(float(mel.max()), 1e-10), top_db=80.0)


def spectrogram_image(audio: np.ndarray, sample_rate: int, hop: int = 512) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] of the log-mel spectrogram (low frequencies at the bottom)."""
    from matplotlib import colormaps

    db = log_mel(audio, sample_rate, hop=hop)
    normalized = (db - db.min()) / max(float(np.ptp(db)), 1e-6)
    rgb = colormaps["magma"](normalized[::-1])[..., :3]
    return (rgb * 255).astype(np.uint8)


def save_spectrogram_png(audio: np.ndarray, sample_rate: int, path: str | os.PathLike, title: str = "") -> Path:
    """Writes a labelled spectrogram figure (time in seconds, mel frequency in Hz) atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import librosa.display
    import matplotlib.pyplot as plt

    hop = 512
    db = log_mel(audio, sample_rate, hop=hop)
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    image = librosa.display.specshow(db, sr=sample_rate, hop_length=hop, x_axis="time", y_axis="mel", ax=ax,
                                     cmap="magma")
    fig.colorbar(image, ax=ax, format="%+2.0f dB")
    if title:
        ax.set_title(title if len(title) <= 90 else title[:87] + "...", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def save_spectrogram_grid(rows: Sequence[Sequence[tuple[np.ndarray, int]]], column_titles: Sequence[str],
                          row_titles: Sequence[str], path: str | os.PathLike) -> Path:
    """One figure of log-mel spectrograms, `rows[i][j]` = (audio, rate) under column j, written atomically: e.g. a
    real clip, its reconstruction and a generation for the same caption side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import librosa.display
    import matplotlib.pyplot as plt

    hop = 512
    fig, axes = plt.subplots(len(rows), len(column_titles), figsize=(4.0 * len(column_titles), 2.2 * len(rows)),
                             dpi=100, squeeze=False)
    for i, (row, row_title) in enumerate(zip(rows, row_titles)):
        for j, (audio, rate) in enumerate(row):
            ax = axes[i][j]
            librosa.display.specshow(log_mel(audio, rate, hop=hop), sr=rate, hop_length=hop, x_axis="time",
                                     y_axis="mel", ax=ax, cmap="magma")
            ax.set_title(column_titles[j] if i == 0 else "", fontsize=9)
            ax.set_xlabel("")
            label = row_title if len(row_title) <= 40 else row_title[:37] + "..."
            ax.set_ylabel(label if j == 0 else "", fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: str | os.PathLike) -> Path:
    """Writes a matplotlib figure as PNG atomically and closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format="png")
    finally:
        plt.close(fig)
    return path

"""What evaluation reads: a folder of generations, a reference set, series of generation folders; and the plot.

Generations: `DIR/generations.jsonl`, one JSON object per clip as launch.generate writes it: `prompt`, `seed`,
`sampler`, `steps`, `cfg_scale`, `seconds_total`, `wall_time` (seconds to generate the clip) and `attributes` when
the prompt came from the embedded set. The audio file is the line's `path` (or `audio` / `file`) relative to DIR,
else `DIR/<n>.wav` with n the line's `index` or its 0-based position.

Reference set: an audio folder with `manifest.jsonl` (data_pipelines.audio_folder: licence-checked, captions and
attributes) or a plain folder of audio files (ids = file stems, no captions).

Series: a folder whose sub-folders `<step>` or `step_<step>` each hold a generations folder.

Any existing audio can be evaluated as a generation set: `write_index` lists files (real clips, autoencoded clips)
with their prompts into a generations.jsonl. `crop_clips` makes `AudioClip.load` return only the first seconds of
each clip, so every set is analysed at one length (musicdiff.eval.generation_eval).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.audio_folder import AUDIO_SUFFIXES, MANIFEST_NAME, scan_folder
from musicdiff.audio.io import load_audio, read_info
from musicdiff.errors import DataError
from musicdiff.files import atomic_write_bytes

GENERATIONS_NAME = "generations.jsonl"


@dataclasses.dataclass(frozen=True)
class AudioClip:
    path: Path
    prompt: str  # "" when unknown
    key: str  # pairing id: the prompt (pair_by="prompt") or the file stem (pair_by="stem")
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)  # the generations.jsonl line
    crop_seconds: float = 0.0  # > 0: load() returns only the first crop_seconds (0: the whole clip)

    def load(self) -> tuple[np.ndarray, int]:
        """(float32 [channels, samples] at the file's rate, that rate); the first `crop_seconds` when cropped
        (rounded up to whole samples, so a clip of exactly that length is kept whole)."""
        try:
            audio, rate = load_audio(self.path, None, None), read_info(self.path).sample_rate
        except (RuntimeError, OSError, ValueError) as err:
            raise DataError(f"{self.path}: cannot be decoded ({err})") from None
        if self.crop_seconds > 0:
            audio = audio[..., :math.ceil(self.crop_seconds * rate - 1e-6)]
        return audio, rate

    def seconds(self) -> float:
        """The file's duration in seconds (from its header, uncropped)."""
        try:
            return read_info(self.path).duration
        except (RuntimeError, OSError, ValueError) as err:
            raise DataError(f"{self.path}: cannot be read ({err})") from None


def heldout_prompt_clips(config: Any) -> list[AudioClip] | None:
    """The clips a series' prompts came from when they come from a held-out folder (`config.prompts_dir`: its first
    `num_prompts` clips), else None. They are the real row and what KL pairs each generation with."""
    prompts_dir = str(config.get("prompts_dir", ""))
    if not prompts_dir:
        return None
    return read_reference(prompts_dir, str(config.reference.pair_by), int(config.num_prompts))


def crop_clips(clips: Sequence[AudioClip], seconds: float) -> list[AudioClip]:
    """The clips cropped to their first `seconds` (0: whole clips), from the start so the crop is deterministic."""
    return [dataclasses.replace(clip, crop_seconds=float(seconds)) for clip in clips]


def _pair_key(prompt: str, path: Path, pair_by: str) -> str:
    if pair_by == "prompt":
        return prompt
    if pair_by == "stem":
        return path.stem
    raise DataError(f"config.reference.pair_by={pair_by!r}: use 'prompt' or 'stem'")


def read_generations(folder: str | Path, pair_by: str = "prompt") -> list[AudioClip]:
    """The clips of a generations folder (module docstring); refuses a missing file or a line without a prompt."""
    folder = Path(folder)
    listing = folder / GENERATIONS_NAME
    if not listing.is_file():
        raise DataError(f"{listing}: missing; generate with launch.generate (it writes {GENERATIONS_NAME} beside "
                        f"the audio), or pass the folder that holds it as --config.generated_dir")
    clips = []
    for number, line in enumerate(listing.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{listing} line {number + 1}: not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f"{listing} line {number + 1}: needs a 'prompt' string")
        name = record.get("path") or record.get("audio") or record.get("file")
        path = folder / name if isinstance(name, str) else folder / f"{record.get('index', len(clips))}.wav"
        if not path.is_file():
            raise DataError(f"{listing} line {number + 1}: its audio {path} does not exist")
        clips.append(AudioClip(path, record["prompt"], _pair_key(record["prompt"], path, pair_by),
                               dict(record.get("attributes") or {}), record))
    if not clips:
        raise DataError(f"{listing}: lists no generation")
    return clips


def read_reference(folder: str | Path, pair_by: str = "prompt", max_clips: int = 0) -> list[AudioClip]:
    """The clips of a reference folder: its manifest's usable items, else every audio file under it (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"config.reference.audio_dir={folder}: no such directory")
    if (folder / MANIFEST_NAME).is_file():
        scanned = scan_folder(folder)
        clips = [AudioClip(Path(item.path), item.caption, _pair_key(item.caption, Path(item.path), pair_by),
                           dict(item.attributes)) for item in scanned.items]
    else:
        if pair_by == "prompt":
            raise DataError(f"{folder}: has no {MANIFEST_NAME}, so its clips have no captions to pair with prompts; "
                            f"name files by id and set --config.reference.pair_by=stem")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        clips = [AudioClip(p, "", p.stem) for p in files]
    if max_clips > 0:
        clips = clips[:max_clips]
    if not clips:
        raise DataError(f"{folder}: holds no usable reference audio")
    return clips


def write_index(folder: str | Path, clips: Sequence[AudioClip]) -> Path:
    """Writes `folder/generations.jsonl` listing existing audio files (absolute paths) with their prompts and
    attributes, so a clip set that was not generated (the real clips, autoencoded clips) is evaluated exactly like
    a generations folder. Returns the index path."""
    folder = Path(folder)
    lines = []
    for clip in clips:
        record = dict(prompt=clip.prompt, path=str(Path(clip.path).resolve()))
        if clip.attributes:
            record["attributes"] = clip.attributes
        lines.append(json.dumps(record))
    if not lines:
        raise DataError(f"write_index: no clips to list in {folder / GENERATIONS_NAME}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / GENERATIONS_NAME, ("\n".join(lines) + "\n").encode())
    return folder / GENERATIONS_NAME


def series_folders(root: str | Path) -> dict[int, Path]:
    """{step: folder} of the sub-folders of `root` named `<step>` or `step_<step>` that hold generations."""
    root = Path(root)
    found = {}
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        match = re.fullmatch(r"(?:step_)?(\d+)", child.name)
        if match and (child / GENERATIONS_NAME).is_file():
            found[int(match.group(1))] = child
    if not found:
        raise DataError(f"config.series_dir={root}: no sub-folder <step> or step_<step> with a {GENERATIONS_NAME}")
    return dict(sorted(found.items()))


def inference_time(clips: Sequence[AudioClip]) -> dict[str, float]:
    """Wall-clock seconds per generated clip (from `wall_time`) and the real-time factor (audio s / wall s)."""
    walls = np.array([float(c.record["wall_time"]) for c in clips if "wall_time" in c.record], np.float64)
    if walls.size == 0:
        return {}
    out = dict(seconds_per_clip=float(walls.mean()), seconds_per_clip_median=float(np.median(walls)),
               seconds_per_clip_max=float(walls.max()), timed_clips=float(walls.size))
    timed = [c for c in clips if "wall_time" in c.record]
    totals = [float(c.record["seconds_total"]) for c in timed if "seconds_total" in c.record]
    if totals and len(totals) == walls.size:
        out["realtime_factor"] = float(np.sum(totals) / max(np.sum(walls), 1e-9))
    return out


def generation_settings(clips: Sequence[AudioClip]) -> dict[str, Any]:
    """The sampler settings of the generations (a value, or the sorted distinct values when they vary)."""
    settings = {}
    for name in ("sampler", "steps", "cfg_scale", "seconds_total"):
        values = sorted({json.dumps(c.record[name]) for c in clips if name in c.record})
        if values:
            settings[name] = json.loads(values[0]) if len(values) == 1 else [json.loads(v) for v in values]
    return settings


def metric_point(entry: Any) -> tuple[float, float, float] | None:
    """(value, lo, hi) of a series entry: a number (lo = hi = value) or {value, lo, hi}; None if not finite."""
    if isinstance(entry, Mapping):
        value = entry.get("value")
        lo, hi = entry.get("lo", value), entry.get("hi", value)
    else:
        value = lo = hi = entry
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (value, lo, hi)):
        return None
    return float(value), float(lo), float(hi)


def plot_series(series: Mapping[int, Mapping[str, Any]], path: str | Path, title: str = "", *,
                reference_rows: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """One panel per metric, value against checkpoint step; written atomically as PNG (musicdiff.files).

    A metric's entry is a number or {value, lo, hi}: the interval is drawn as a vertical bar at the step (a bar,
    not symmetric error bars, because a bootstrap interval need not contain the value). Each reference row
    (name -> {metric: entry}) is a labelled horizontal line with its interval as a shaded band."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference_rows = dict(reference_rows or {})
    steps = sorted(series)
    points = {step: {n: p for n, e in values.items() if (p := metric_point(e))} for step, values in series.items()}
    references = {row: {n: p for n, e in values.items() if (p := metric_point(e))}
                  for row, values in reference_rows.items()}
    names = sorted({n for values in [*points.values(), *references.values()] for n in values})
    if not names:
        raise DataError("plot_series: no numeric metric to plot")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        for number, (row, values) in enumerate(references.items()):
            if name in values:
                value, lo, hi = values[name]
                colour = colours[(number + 1) % len(colours)]  # colour 0 is the series'
                ax.axhline(value, color=colour, linestyle="--", linewidth=1.0, label=row)
                ax.axhspan(lo, hi, color=colour, alpha=0.15, linewidth=0)
        xs = [s for s in steps if name in points[s]]
        if xs:
            values = [points[s][name] for s in xs]
            ax.plot(xs, [v for v, _, _ in values], marker="o", color=colours[0], label="checkpoints")
            ax.vlines(xs, [lo for _, lo, _ in values], [hi for _, _, hi in values], color=colours[0], linewidth=2.0,
                      alpha=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3)
        if references:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)  # keep the title clear of the top panels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path

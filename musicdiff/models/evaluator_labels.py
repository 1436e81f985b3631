"""The embedded evaluator's label vocabulary: what a prompt asks for (its attributes, or its text: "... at 120 BPM",
"... in E-flat minor"), those targets <-> class indices, and attribute accuracy. Below training and eval: the
evaluator's trainer and the metrics share it.

Heads (musicdiff.models.audio_evaluator): key = tonic pitch class (12, C = 0), mode (major, minor), tempo bucket
(bucket i: tempo_edges[i-1] <= bpm < tempo_edges[i]), instruments (multi-label over `instruments`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from musicdiff.models.audio_evaluator import MODE_CLASSES
from musicdiff.models.beat_grid import prompt_bpm

HEADS = ("key", "mode", "tempo", "instruments")
PITCH_CLASSES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
MODES = ("major", "minor")


def parse_pitch_class(name: str) -> int:
    """"Eb", "F#", "E-flat", "f sharp" -> pitch class (C = 0)."""
    text = name.strip().replace("♭", "b").replace("♯", "#")
    match = re.fullmatch(r"([A-Ga-g])\s*(#|b|-?\s*sharp|-?\s*flat)?", text)
    if not match:
        raise ValueError(f"not a key tonic: {name!r}")
    pitch = PITCH_CLASSES[match.group(1).upper()]
    accidental = (match.group(2) or "").replace("-", "").strip()
    if accidental in ("#", "sharp"):
        pitch += 1
    elif accidental in ("b", "flat"):
        pitch -= 1
    return pitch % 12


_DRUMS_TEXT = re.compile(r"\bdrum(s|\s+kit)?\b", re.IGNORECASE)
_KEY_TEXT = re.compile(r"\b([A-G](?:-flat|-sharp|b|#)?)\s+(major|minor)\b")


def prompt_targets(prompt: str, attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{bpm, tonic, mode, instruments, drums} the prompt asks for, from attributes when given, else from the text.

    Keys the prompt does not state are absent; `drums` (bool) is known from attributes' instruments, and from text
    only when it names drums (a caption that does not may still mean a kit)."""
    targets: dict[str, Any] = {}
    attributes = attributes or {}
    if "bpm" in attributes:
        targets["bpm"] = float(attributes["bpm"])
    if "tonic_pitch_class" in attributes:
        targets["tonic"] = int(attributes["tonic_pitch_class"])
    elif "key" in attributes:
        targets["tonic"] = parse_pitch_class(str(attributes["key"]))
    if attributes.get("mode") in MODES:
        targets["mode"] = attributes["mode"]
    if "instruments" in attributes:
        targets["instruments"] = list(attributes["instruments"])
        targets["drums"] = "drums" in targets["instruments"]
    elif _DRUMS_TEXT.search(prompt):
        targets["drums"] = True
    if "bpm" not in targets and (bpm := prompt_bpm(prompt)):
        targets["bpm"] = bpm
    if "tonic" not in targets and (match := _KEY_TEXT.search(prompt)):
        targets["tonic"] = parse_pitch_class(match.group(1))
        targets.setdefault("mode", match.group(2))
    return targets


def tempo_bucket(bpm: float, edges: Sequence[float]) -> int:
    return int(np.searchsorted(np.asarray(edges, np.float64), float(bpm), side="right"))


def encode_targets(targets: Mapping[str, Any], model_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Class indices / multi-hot for the targets present (keys as prompt_targets gives them)."""
    out: dict[str, np.ndarray] = {}
    if "tonic" in targets:
        out["key"] = np.int32(targets["tonic"])
    if "mode" in targets:
        out["mode"] = np.int32(MODE_CLASSES.index(targets["mode"]))
    if "bpm" in targets:
        out["tempo"] = np.int32(tempo_bucket(targets["bpm"], model_config["tempo_edges"]))
    if "instruments" in targets:
        names = list(model_config["instruments"])
        hot = np.zeros(len(names), np.float32)
        for name in targets["instruments"]:
            if name in names:
                hot[names.index(name)] = 1.0
        out["instruments"] = hot
    return out


def decode_predictions(probs: Mapping[str, np.ndarray], instrument_probs: np.ndarray,
                       model_config: Mapping[str, Any], threshold: float = 0.5) -> dict[str, Any]:
    """Readable predictions from a clip's head distributions (instrument_probs: per-instrument sigmoid)."""
    names = list(model_config["instruments"])
    return dict(key=int(np.argmax(probs["key"])), mode=MODE_CLASSES[int(np.argmax(probs["mode"]))],
                tempo=int(np.argmax(probs["tempo"])),
                instruments=[n for n, p in zip(names, instrument_probs) if p >= threshold])


RECALL_PREFIX = "attr_recall_"  # attr_recall_<instrument>: how often a prompted instrument is heard


def attribute_scores(predictions: Mapping[str, Any], targets: Mapping[str, Any],
                     model_config: Mapping[str, Any]) -> dict[str, float]:
    """Per-clip correctness of the predicted attributes against what the prompt asked for.

    instrument_exact: the predicted set equals the prompted set; instrument_tp/fp/fn count for a micro F1."""
    out: dict[str, float] = {}
    encoded = encode_targets(targets, model_config)
    if "key" in encoded:
        out["attr_key_acc"] = float(predictions["key"] == int(encoded["key"]))
    if "mode" in encoded:
        out["attr_mode_acc"] = float(predictions["mode"] == targets["mode"])
    if "key" in encoded and "mode" in encoded:
        out["attr_keymode_acc"] = out["attr_key_acc"] * out["attr_mode_acc"]
    if "tempo" in encoded:
        out["attr_tempo_bucket_acc"] = float(predictions["tempo"] == int(encoded["tempo"]))
    if "instruments" in encoded:
        wanted = {n for n in targets["instruments"] if n in model_config["instruments"]}
        got = set(predictions["instruments"])
        out.update(attr_instrument_exact=float(wanted == got), instrument_tp=float(len(wanted & got)),
                   instrument_fp=float(len(got - wanted)), instrument_fn=float(len(wanted - got)))
        # Per prompted instrument: heard or not (its recall over the clips that ask for it).
        out.update({f"{RECALL_PREFIX}{name}": float(name in got) for name in sorted(wanted)})
    return out


def summarize_attribute_scores(per_clip: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Means of the accuracies and the micro F1 of instruments over clips."""
    summary: dict[str, float] = {}
    for name in ("attr_key_acc", "attr_mode_acc", "attr_keymode_acc", "attr_tempo_bucket_acc",
                 "attr_instrument_exact"):
        values = [c[name] for c in per_clip if name in c]
        if values:
            summary[name] = float(np.mean(values))
    tp = sum(c.get("instrument_tp", 0.0) for c in per_clip)
    fp = sum(c.get("instrument_fp", 0.0) for c in per_clip)
    fn = sum(c.get("instrument_fn", 0.0) for c in per_clip)
    if any("instrument_tp" in c for c in per_clip):
        summary["attr_instrument_f1"] = float(2 * tp / max(2 * tp + fp + fn, 1.0))
    for name in sorted({key for clip in per_clip for key in clip if key.startswith(RECALL_PREFIX)}):
        summary[name] = float(np.mean([clip[name] for clip in per_clip if name in clip]))
    return summary

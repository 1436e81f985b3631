"""A deterministic held-out split of an audio folder, shared by trainers and evaluators.

A clip is held out when the SHA-256 of its path relative to the folder root, read as a number in [0, 1), is below
`heldout_fraction`. Membership depends on nothing but the clip's own relative path: adding, removing or moving other
files, changing scan thresholds, or moving the whole folder never moves a clip between the splits, so a model trained
on the training split never sees a clip that an evaluation of the held-out split scores. The held-out share of a
small folder varies around the fraction (it is a hash, not a quota).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from data_pipelines.audio_folder import AudioItem
from musicdiff.errors import ConfigError

SPLITS = ("train", "heldout", "all")


def heldout_score(relpath: str) -> float:
    """The clip's position in [0, 1): the first 8 bytes of SHA-256(relpath) over 2^64."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def is_heldout(relpath: str, heldout_fraction: float) -> bool:
    return heldout_score(relpath) < heldout_fraction


def check_fraction(heldout_fraction: float, key: str = "config.data.heldout_fraction") -> float:
    fraction = float(heldout_fraction)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"{key}={heldout_fraction}: must be in [0, 1) (0 keeps every clip for training)")
    return fraction


def split_items(items: Sequence[AudioItem], heldout_fraction: float, split: str) -> list[AudioItem]:
    """The items of `split` ("train", "heldout" or "all"), in scan order."""
    fraction = check_fraction(heldout_fraction)
    if split == "all":
        return list(items)
    if split not in SPLITS:
        raise ConfigError(f"config.data.split={split!r}: choose one of {', '.join(SPLITS)}")
    want_heldout = split == "heldout"
    return [item for item in items if is_heldout(item.relpath, fraction) == want_heldout]

"""The clips a precompute run encodes: an audio folder scan or a TFDS build, with a hash of everything read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections

from data_pipelines.audio_folder import data_root, scan
from data_pipelines.grain_pipeline import AudioFolderSource
from musicdiff.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The clips to encode: a clip-record source, their lengths and manifest fields, and what the scan reported."""

    source: Any
    lengths: list[tuple[int, int]]
    clips: list[dict[str, Any]]
    report: dict[str, Any]
    inputs_sha256: str


def open_dataset(config: ml_collections.ConfigDict) -> Dataset:
    kind = config.data.source
    root = data_root(config)
    if kind == "audio_folder":
        result = scan(config)
        source = AudioFolderSource(result.items)
        levels = [(item.peak_db, item.rms_db) for item in result.items]
        report = dict(kind=kind, root=str(root), usable=result.usable, skipped=result.skipped,
                      skipped_total=len(result.skipped_entries))
    elif kind == "tfds":
        from data_pipelines.tfds_audio_folder import open_tfds_source

        source, levels = open_tfds_source(root), None
        report = dict(kind=kind, root=str(root), usable=len(source), skipped={}, skipped_total=0)
    else:
        raise ConfigError(f"config.data.source={kind!r}: expected 'audio_folder' or 'tfds'")
    if len(source) == 0:
        raise DataError(f"{root}: no usable clips to precompute (run launch.inspect_data on it to see why)")
    lengths = source.clip_lengths()
    clips = [source.metadata(index) for index in range(len(source))]
    digest = hashlib.sha256(json.dumps([clips, lengths, levels], sort_keys=True).encode()).hexdigest()
    return Dataset(source, lengths, clips, report, digest)

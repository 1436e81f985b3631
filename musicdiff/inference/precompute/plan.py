"""What a precompute run computes (the plan), how shards are laid out and owned, and what the workdir already holds:
outputs of the same plan are resumed, anything else is refused unless `overwrite`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import ml_collections

from data_pipelines.latent_source import FORMAT, MANIFEST_NAME, PLAN_NAME, VERSION, shard_name, shard_summary_name
from musicdiff.checkpoints import CheckpointRef
from musicdiff.config import to_dict
from musicdiff.errors import ConfigError
from musicdiff.inference.precompute.dataset import Dataset
from musicdiff.models.text_encoder import TOKENIZER_DIR

_DATA_SETTINGS = ("source", "sample_rate", "sample_size", "channels", "normalize", "license_allowlist",
                  "silence_threshold_db", "min_seconds")
_SETTINGS = ("dtype", "batch_size", "windows_per_shard", "encode_chunk_frames", "encode_overlap_frames",
             "text_batch_size", "record_options")


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Windows 0..num_windows-1 cut into consecutive shards of windows_per_shard (the last one may be shorter)."""

    num_windows: int
    windows_per_shard: int

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_windows // self.windows_per_shard))

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.windows_per_shard
        return start, min(start + self.windows_per_shard, self.num_windows)

    def owned(self, process_index: int, process_count: int) -> list[int]:
        return [shard for shard in range(self.num_shards) if shard % process_count == process_index]


def _identity(plan: dict[str, Any]) -> dict[str, Any]:
    """What must match for outputs to be reused: everything but where the checkpoint was found."""
    return {**plan, "autoencoder": {k: v for k, v in plan["autoencoder"].items() if k != "checkpoint"}}


def plan_sha256(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_identity(plan), sort_keys=True).encode()).hexdigest()


def make_plan(config: ml_collections.ConfigDict, ref: CheckpointRef, dataset: Dataset, layout: ShardLayout) -> dict:
    text = to_dict(config.text_encoder)
    text.pop("tokenizer_path", None)  # set by the stage itself
    data, top = to_dict(config.data), to_dict(config)
    return {
        "format": FORMAT, "version": VERSION,
        "autoencoder": {"checkpoint": str(ref.step_dir.resolve()), "fingerprint": ref.fingerprint(), "step": ref.step},
        "inputs_sha256": dataset.inputs_sha256, "num_windows": layout.num_windows, "num_shards": layout.num_shards,
        "settings": {"data": {key: data[key] for key in _DATA_SETTINGS}, "text_encoder": text,
                     **{key: top[key] for key in _SETTINGS}},
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix[:-1]}: {str(old)[:40]} -> {str(new)[:40]}"]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def output_status(out: Path, plan: dict[str, Any], overwrite: bool) -> str:
    """"complete", "resume", "fresh" or "replace" (only with overwrite); refuses a mismatch otherwise."""
    manifest = read_json(out / MANIFEST_NAME)
    fix = "write to another --workdir, or pass --config.overwrite=True to replace it"
    if manifest is not None and not isinstance(manifest.get("plan"), dict):
        if overwrite:
            return "replace"
        raise ConfigError(f"{out / MANIFEST_NAME}: not written by this version of launch.precompute_latents; {fix}")
    for name, previous in ((MANIFEST_NAME, manifest and manifest["plan"]), (PLAN_NAME, read_json(out / PLAN_NAME))):
        if previous is None:
            continue
        old_ae, new_ae = previous["autoencoder"], plan["autoencoder"]
        identify = lambda ae: f"fingerprint {ae.get('fingerprint')}"
        if old_ae.get("fingerprint") != new_ae["fingerprint"]:
            if overwrite:
                return "replace"
            raise ConfigError(f"{out / name}: made with autoencoder {old_ae.get('checkpoint')} ({identify(old_ae)}), "
                              f"but config.autoencoder_checkpoint={new_ae['checkpoint']} has {identify(new_ae)}; "
                              f"{fix}")
        changed = _differences(_identity(previous), _identity(plan))
        if changed:
            if overwrite:
                return "replace"
            raise ConfigError(f"{out / name}: made with other settings ({'; '.join(changed[:4])}); {fix}")
    if manifest is not None:
        shards_present = all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"]
                             for s in manifest["shards"])
        return "complete" if shards_present else "resume"
    return "resume" if (out / PLAN_NAME).is_file() else "fresh"


def remove_outputs(out: Path) -> None:
    for pattern in ("shard-*.array_record", "shard-*.array_record.partial", "shard-*.json", MANIFEST_NAME, PLAN_NAME):
        for path in out.glob(pattern):
            path.unlink()
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """Temporary files of writes that a kill interrupted (atomic JSON writes, a tokenizer being built)."""
    for path in out.glob(".*.tmp"):
        path.unlink(missing_ok=True)
    for path in out.glob(".tokenizer.*"):
        shutil.rmtree(path, ignore_errors=True)


def shard_finished(out: Path, shard: int, count: int, digest: str) -> bool:
    summary = read_json(out / shard_summary_name(shard, count))
    path = out / shard_name(shard, count)
    return (summary is not None and summary.get("plan_sha256") == digest and path.is_file()
            and path.stat().st_size == summary.get("bytes"))

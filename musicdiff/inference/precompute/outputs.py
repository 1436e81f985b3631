"""Precompute outputs: one shard's records (written to `.partial`, renamed when complete, then summarised) and the
manifest written from the summaries once every shard is finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines.latent_source import FORMAT, MANIFEST_NAME, VERSION, shard_name, shard_summary_name
from musicdiff.checkpoints import CheckpointRef
from musicdiff.config import downsampling_ratio, to_dict
from musicdiff.errors import DataError
from musicdiff.files import atomic_write_json, commit_file, sha256_file
from musicdiff.inference.precompute.dataset import Dataset
from musicdiff.inference.precompute.plan import ShardLayout, plan_sha256, read_json
from musicdiff.models.text_encoder import text_encoder_kind


# Why a window of a shard was not written: its audio changed or vanished after the scan, or its latents are not
# finite (a broken autoencoder, or input it cannot encode). Counted per shard and in the manifest, never fatal.
SKIP_REASONS = ("changed_since_scan", "non_finite_latents")


class ShardWriter:
    """One shard: records go to `.partial`, which is renamed once every window is written or skipped; then its
    summary (items written, windows skipped by reason)."""

    def __init__(self, out: Path, shard: int, layout: ShardLayout, options: str, digest: str):
        self.final = out / shard_name(shard, layout.num_shards)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.summary_path = out / shard_summary_name(shard, layout.num_shards)
        start, stop = layout.bounds(shard)
        self.expected, self.items, self.real_samples, self.digest = stop - start, 0, 0, digest
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.summary_path.unlink(missing_ok=True)
        self._writer = ArrayRecordWriter(str(self.partial), options)

    def write(self, record: bytes, real_samples: int) -> None:
        self._writer.write(record)
        self.items += 1
        self.real_samples += real_samples

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    @property
    def complete(self) -> bool:
        return self.items + sum(self.skipped.values()) == self.expected

    def finish(self, sample_rate: int) -> dict[str, Any]:
        self._writer.close()
        commit_file(self.partial, self.final)
        summary = {"file": self.final.name, "items": self.items, "bytes": self.final.stat().st_size,
                   "sha256": sha256_file(self.final), "seconds": self.real_samples / sample_rate,
                   "skipped": self.skipped, "plan_sha256": self.digest}
        atomic_write_json(self.summary_path, summary)
        return summary



def write_manifest(out: Path, config, plan: dict[str, Any], dataset: Dataset, ref: CheckpointRef) -> dict:
    ae = ref.config.autoencoder
    ratio = downsampling_ratio(ae)
    shards, summaries = [], []
    for shard in range(plan["num_shards"]):
        summary = read_json(out / shard_summary_name(shard, plan["num_shards"]))
        if summary is None or summary.get("plan_sha256") != plan_sha256(plan):
            raise DataError(f"{out / shard_name(shard, plan['num_shards'])}: not finished after every process was "
                            f"done; re-run launch.precompute_latents on {out}")
        summaries.append(summary)
        shards.append({key: summary[key] for key in ("file", "items", "sha256", "bytes", "seconds")})
    frames = int(config.data.sample_size) // ratio
    skipped = {reason: sum(shard.get("skipped", {}).get(reason, 0) for shard in summaries) for reason in SKIP_REASONS}
    manifest = {
        "format": FORMAT, "version": VERSION,
        "autoencoder": {**plan["autoencoder"], "config": to_dict(ae)},
        "autoencoder_checkpoint": plan["autoencoder"]["checkpoint"],
        "text_encoder": text_encoder_kind(config.text_encoder.name).manifest_entry(config.text_encoder, out),
        "sample_rate": int(config.data.sample_rate), "sample_size": int(config.data.sample_size),
        "downsampling_ratio": ratio, "latent_rate": config.data.sample_rate / ratio,
        "latent_channels": int(ae.latent_dim), "latent_frames": frames, "latent_shape": [int(ae.latent_dim), frames],
        "dtype": config.dtype, "posterior": ae.bottleneck.type == "vae",
        "num_items": sum(s["items"] for s in shards), "hours": sum(s["seconds"] for s in shards) / 3600.0,
        "shards": shards, "source": dataset.report, "skipped_windows": skipped, "inputs_sha256": plan["inputs_sha256"],
        "windows_per_shard": int(config.windows_per_shard), "config": to_dict(config), "plan": plan,
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest

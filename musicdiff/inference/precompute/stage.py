"""The precompute stage driver (`precompute_latents`): checks, plan and resume decision, the text encoder's
preparation, shard encoding with barriers between the phases, and the manifest (see the package docstring)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from data_pipelines.grain_pipeline import ClipSpec, batch_examples, window_dataset, window_layout
from data_pipelines.latent_source import MANIFEST_NAME, PLAN_NAME, encode_record
from musicdiff.checkpoints import CheckpointError, CheckpointRef, find_checkpoint, load_model
from musicdiff.config import downsampling_ratio, validate
from musicdiff.errors import ConfigError, DataError
from musicdiff.files import atomic_write_json
from musicdiff.inference.precompute.dataset import Dataset, open_dataset
from musicdiff.inference.precompute.outputs import ShardWriter, write_manifest
from musicdiff.inference.precompute.plan import (ShardLayout, make_plan, output_status, plan_sha256, read_json,
                                                 remove_leftovers, remove_outputs, shard_finished)
from musicdiff.inference.precompute.window_encoder import WindowEncoder
from musicdiff.models.text_encoder import text_encoder_kind
from musicdiff.parallel.distributed import barrier, initialize_distributed
from musicdiff.parallel.mesh import mesh_and_rules

KILL_AFTER_ENV = "MUSICDIFF_PRECOMPUTE_KILL_AFTER_WINDOWS"
STORAGE_DTYPES = ("float32", "bfloat16", "float16")

log = logging.getLogger(__name__)


class _PendingWindow(grain.transforms.Map):
    """Work entry (global window id, or -1 for the padding that completes a shard's last batch) -> example. A window
    whose file changed or vanished since the scan becomes padding marked `unreadable`: skipped and counted."""

    def __init__(self, windows: grain.MapDataset, spec: ClipSpec):
        self.windows = windows
        self.padding = {"audio": np.zeros((spec.channels, spec.sample_size), np.float32),
                        "padding_mask": np.zeros(spec.sample_size, np.float32), "seconds_start": np.float32(0),
                        "seconds_total": np.float32(0), "caption": "", "index": np.int64(-1),
                        "offset": np.int64(-1)}

    def map(self, window: int) -> dict[str, Any]:
        example, unreadable = self.padding, False
        if window >= 0:
            try:
                example = self.windows[int(window)]
            except DataError as err:
                log.warning("skipping window %d: %s", window, err)
                unreadable = True
        return {**example, "window": np.int64(window), "unreadable": np.bool_(unreadable)}


def _check_config(config: ml_collections.ConfigDict, ae: ml_collections.ConfigDict) -> None:
    if config.dtype not in STORAGE_DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    if config.windows_per_shard <= 0:
        raise ConfigError(f"config.windows_per_shard={config.windows_per_shard}: must be positive, e.g. 1024")
    text_encoder_kind(config.text_encoder.name)  # an unknown name fails here, before any work
    ratio = downsampling_ratio(ae)
    if config.data.sample_size % ratio:
        fixed = (config.data.sample_size // ratio + 1) * ratio
        raise ConfigError(f"config.data.sample_size={config.data.sample_size}: must be a multiple of the "
                          f"autoencoder's downsampling ratio {ratio}; use --config.data.sample_size={fixed}")
    for key, model_key in (("sample_rate", "sample_rate"), ("channels", "in_channels")):
        if config.data[key] != ae[model_key]:
            raise ConfigError(f"config.data.{key}={config.data[key]}: the autoencoder has {model_key}="
                              f"{ae[model_key]}; set --config.data.{key}={ae[model_key]}")


def _open_checkpoint(path: str) -> CheckpointRef:
    if not path:
        raise ConfigError("config.autoencoder_checkpoint is empty: pass the autoencoder's training workdir (or a "
                          "checkpoint step directory) as --config.autoencoder_checkpoint=DIR")
    try:
        ref = find_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"config.autoencoder_checkpoint={path}: {err}") from None
    if "autoencoder" not in ref.config:
        raise ConfigError(f"config.autoencoder_checkpoint={path}: {ref.step_dir} holds no autoencoder config")
    return ref


@functools.lru_cache(maxsize=1)
def _restored_autoencoder(step_dir: str, fingerprint: str, mesh: jax.sharding.Mesh, rules: tuple) -> nnx.Module:
    """The autoencoder restored onto `mesh`, kept for the next call with the same weights (the content fingerprint)
    and layout: further runs in one process (several folders, a benchmark) skip the restore, seconds even for a
    small model. `fingerprint` is only the cache key."""
    del fingerprint
    return load_model(find_checkpoint(step_dir), "autoencoder", mesh=mesh, rules=rules)


def _encode_shards(config: ml_collections.ConfigDict, out: Path, ref: CheckpointRef, fingerprint: str,
                   dataset: Dataset, layout: ShardLayout, windows: list[tuple[int, int]], pending: list[int],
                   digest: str) -> int:
    """Encodes and writes the `pending` shards of this process; returns the number of windows written."""
    mesh, rules = mesh_and_rules(config, jax.local_devices())
    encoder = WindowEncoder(_restored_autoencoder(str(ref.step_dir), fingerprint, mesh, rules), mesh, rules, config)
    caption_fields = text_encoder_kind(config.text_encoder.name).caption_fields(
        config.text_encoder, out, mesh=mesh, rules=rules, batch_size=int(config.text_batch_size),
        dtype=jnp.dtype(config.dtype))
    spec = ClipSpec.from_config(config.data)
    batch_size = int(config.batch_size)
    work = []
    for shard in pending:
        start, stop = layout.bounds(shard)
        work += list(range(start, stop)) + [-1] * (-(stop - start) % batch_size)
    all_windows = window_dataset(dataset.source, config.data, process_index=0, process_count=1)
    ds = grain.MapDataset.source(work).map(_PendingWindow(all_windows, spec))
    batches = batch_examples(ds, batch_size=batch_size, read_threads=int(config.data.read_threads),
                             num_workers=int(config.data.num_workers), drop_remainder=False)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    total = sum(layout.bounds(s)[1] - layout.bounds(s)[0] for s in pending)
    desc = "precompute" if jax.process_count() == 1 else f"precompute [process {jax.process_index()}]"
    progress = tqdm(total=total, unit="window", desc=desc, disable=not config.progress, mininterval=1.0)
    writer, fields, written = None, {}, 0

    def write_batch(batch: dict[str, np.ndarray], encoded: dict[str, jax.Array]) -> None:
        nonlocal writer, fields, written
        host = {key: np.asarray(value) for key, value in encoded.items()}
        for row, window in enumerate(batch["window"]):
            if window < 0:
                continue
            if writer is None:
                shard = int(window) // layout.windows_per_shard
                writer = ShardWriter(out, shard, layout, config.record_options, digest)
                start, stop = layout.bounds(shard)
                captions = [dataset.clips[windows[w][0]]["caption"] for w in range(start, stop)]
                fields = caption_fields(list(dict.fromkeys(captions)))
            record = {key: value[row] for key, value in host.items()}
            if batch["unreadable"][row]:
                writer.skip("changed_since_scan")
            elif not all(np.isfinite(np.asarray(value, np.float32)).all() for value in record.values()):
                writer.skip("non_finite_latents")
            else:
                clip_index = int(batch["index"][row])
                clip = dataset.clips[clip_index]
                real_samples = int(batch["padding_mask"][row].sum())
                record.update(seconds_start=float(batch["seconds_start"][row]),
                              seconds_total=float(batch["seconds_total"][row]), offset=int(batch["offset"][row]),
                              real_samples=real_samples, clip_index=clip_index, window_index=int(window),
                              caption=clip["caption"], license=clip["license"], path=clip["path"],
                              title=clip["title"], artist=clip["artist"],
                              attributes=json.dumps(clip["attributes"], sort_keys=True), **fields[clip["caption"]])
                writer.write(encode_record(record), real_samples)
                written += 1
                if kill_after and written >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            progress.update(1)
            if writer.complete:
                writer.finish(spec.sample_rate)
                writer = None

    in_flight = None
    for batch in batches:
        encoded = encoder(batch["audio"], batch["padding_mask"])  # dispatched; the previous batch is written meanwhile
        if in_flight is not None:
            write_batch(*in_flight)
        in_flight = (batch, encoded)
    if in_flight is not None:
        write_batch(*in_flight)
    progress.close()
    if writer is not None:
        raise RuntimeError(f"{writer.final}: ended with {writer.items} of {writer.expected} windows")
    return written


def precompute_latents(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """The stage (see the module docstring); returns a summary (items, hours, windows/s, skipped inputs)."""
    initialize_distributed(config.get("distributed"))
    validate(config, jax.local_device_count())
    started = time.perf_counter()
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    ref = _open_checkpoint(config.autoencoder_checkpoint)
    _check_config(config, ref.config.autoencoder)
    dataset = open_dataset(config)
    windows = window_layout(dataset.lengths, ClipSpec.from_config(config.data))
    layout = ShardLayout(len(windows), int(config.windows_per_shard))
    plan = make_plan(config, ref, dataset, layout)
    digest = plan_sha256(plan)
    process, processes = jax.process_index(), jax.process_count()
    status = output_status(out, plan, bool(config.overwrite))
    if status == "complete":
        manifest = read_json(out / MANIFEST_NAME)
        summary = _summary(out, manifest, dataset, written=0, skipped_shards=len(layout.owned(process, processes)),
                           seconds=time.perf_counter() - started, nothing_to_do=True)
        if process == 0:
            print(f"{out}: already complete ({manifest['num_items']} windows, {manifest['hours']:.3f} h of audio, "
                  f"{layout.num_shards} shards, autoencoder fingerprint {plan['autoencoder']['fingerprint']}); "
                  f"nothing to do")
        return summary
    barrier(f"musicdiff_precompute_{digest[:16]}_decided", 600)  # everyone has read the old state
    if process == 0:
        if status == "replace":
            log.warning("%s: replacing outputs made with another autoencoder or other settings (overwrite=True)", out)
            remove_outputs(out)
        remove_leftovers(out)
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten once the missing shards exist
        atomic_write_json(out / PLAN_NAME, plan)
        text_encoder_kind(config.text_encoder.name).prepare_outputs(
            config.text_encoder, out, [clip["caption"] for clip in dataset.clips], resuming=status == "resume")
    barrier(f"musicdiff_precompute_{digest[:16]}_planned", 3600)
    owned = layout.owned(process, processes)
    pending = [shard for shard in owned if not shard_finished(out, shard, layout.num_shards, digest)]
    if len(owned) > len(pending):
        log.info("%s: %d of this process's %d shards are finished; skipping them", out, len(owned) - len(pending),
                 len(owned))
    encode_started = time.perf_counter()
    written = (_encode_shards(config, out, ref, plan["autoencoder"]["fingerprint"], dataset, layout, windows, pending,
                              digest) if pending else 0)
    encode_seconds = time.perf_counter() - encode_started
    barrier(f"musicdiff_precompute_{digest[:16]}_encoded", float(config.barrier_timeout_s))
    if process == 0:
        write_manifest(out, config, plan, dataset, ref)
    barrier(f"musicdiff_precompute_{digest[:16]}_manifest", 3600)
    manifest = read_json(out / MANIFEST_NAME)
    summary = _summary(out, manifest, dataset, written=written, skipped_shards=len(owned) - len(pending),
                       seconds=encode_seconds, nothing_to_do=False)
    if process == 0:
        _print_summary(summary)
    return summary


def _summary(out: Path, manifest: dict[str, Any], dataset: Dataset, *, written: int, skipped_shards: int,
             seconds: float, nothing_to_do: bool) -> dict[str, Any]:
    return {"workdir": str(out), "items": manifest["num_items"], "hours": manifest["hours"],
            "shards": len(manifest["shards"]), "shards_skipped": skipped_shards, "windows_encoded": written,
            "encode_seconds": seconds, "windows_per_second": written / seconds if written and seconds > 0 else 0.0,
            "skipped_inputs": dataset.report["skipped"], "skipped_windows": manifest.get("skipped_windows", {}),
            "nothing_to_do": nothing_to_do}


def _print_summary(summary: dict[str, Any]) -> None:
    skipped = {reason: n for reason, n in summary["skipped_inputs"].items() if n}
    print(f"precompute: {summary['items']} windows ({summary['hours']:.3f} h of audio) in {summary['shards']} shards "
          f"at {summary['workdir']}; this process encoded {summary['windows_encoded']} windows in "
          f"{summary['encode_seconds']:.1f} s ({summary['windows_per_second']:.1f} windows/s) and skipped "
          f"{summary['shards_skipped']} finished shards")
    print("skipped inputs: " + (", ".join(f"{reason}={n}" for reason, n in skipped.items()) if skipped else "none"))
    windows = {reason: n for reason, n in summary["skipped_windows"].items() if n}
    print("skipped windows: " + (", ".join(f"{reason}={n}" for reason, n in windows.items()) if windows else "none"))

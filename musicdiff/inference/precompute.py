"""Precompute stage: audio windows -> autoencoder posterior + text, as ArrayRecord shards (data_pipelines.latent_source
documents the record schema, the file layout and the manifest).

Flow (`precompute_latents(config, workdir)`, every JAX process runs it):
1. Scan the audio folder (or open the TFDS build) and lay out consecutive `sample_size` windows of every clip
   (grain_pipeline.window_layout / window_dataset: no random crop, timing and padding mask as for training).
2. Windows are cut into shards of `windows_per_shard`; shard i belongs to process i mod process_count. The plan (the
   autoencoder's fingerprint, a hash of the inputs, every setting that changes the bytes written) is compared with
   what the workdir already holds: another autoencoder or other settings are refused unless `overwrite`.
3. Each process encodes its unfinished shards with the autoencoder on a mesh over its own devices (batched, sharded
   along the batch, one jit'ed program: each shard's last batch is padded to the fixed shape) and writes
   `shard-*.array_record.partial`, renamed to its final name when complete, then a summary `shard-*.json`. No
   computation spans processes (each mesh covers its own devices), so a process with fewer unfinished shards just
   reaches the final barrier sooner; the barriers use the coordination service, not device collectives.
4. After a barrier, process 0 writes manifest.json from the shard summaries. With several processes OUT must be
   a directory every process sees (a shared or network filesystem), as training reads it anyway.

Exactness: the bytes of a shard depend only on its windows and the plan. Batches never straddle shards and always
start at a shard's first window, text is encoded per shard (each distinct caption of a shard once, in a fixed batch
layout), and the embedded-mode tokenizer is built once (process 0, then a barrier) and reused on resume. A killed run
leaves finished shards (with matching summaries) and at most one partial per process; running again skips the former,
rewrites the latter from its first window, and the final files are byte-identical to an uninterrupted run's.

Fault injection for tests: with MUSICDIFF_PRECOMPUTE_KILL_AFTER_WINDOWS=N the process SIGKILLs itself after writing
N records (mid-shard), as a crash would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from tqdm import tqdm

from data_pipelines.audio_folder import data_root, scan
from data_pipelines.grain_pipeline import AudioFolderSource, ClipSpec, batch_examples, window_dataset, window_layout
from data_pipelines.latent_source import (FORMAT, MANIFEST_NAME, PLAN_NAME, TOKENIZER_DIR, VERSION, encode_record,
                                          shard_name, shard_summary_name)
from musicdiff.config import downsampling_ratio, to_dict, validate
from musicdiff.errors import ConfigError, DataError
from musicdiff.files import atomic_write_json, default_mode, fsync_file
from musicdiff.checkpoints import CheckpointError, CheckpointRef, find_checkpoint, load_model
from musicdiff.models.autoencoder import VAEBottleneck
from musicdiff.models.chunking import chunked_encode_features
from musicdiff.models.text_encoder import (build_caption_tokenizer, encode_captions, encoder_config_from,
                                           load_caption_tokenizer, load_text_encoder)
from musicdiff.parallel.distributed import barrier, initialize_distributed
from musicdiff.parallel.mesh import mesh_and_rules
from musicdiff.parallel.sharding import batch_sharding, sharding_context

KILL_AFTER_ENV = "MUSICDIFF_PRECOMPUTE_KILL_AFTER_WINDOWS"
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
TEXT_MODES = ("t5", "embedded")
_DATA_SETTINGS = ("source", "sample_rate", "sample_size", "channels", "normalize", "license_allowlist",
                  "silence_threshold_db", "min_seconds")
_SETTINGS = ("dtype", "batch_size", "windows_per_shard", "encode_chunk_frames", "encode_overlap_frames",
             "text_batch_size", "record_options")

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------ plan and output


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def output_status(out: Path, plan: dict[str, Any], overwrite: bool) -> str:
    """"complete", "resume", "fresh" or "replace" (only with overwrite); refuses a mismatch otherwise."""
    manifest = _read_json(out / MANIFEST_NAME)
    fix = "write to another --workdir, or pass --config.overwrite=True to replace it"
    if manifest is not None and not isinstance(manifest.get("plan"), dict):
        if overwrite:
            return "replace"
        raise ConfigError(f"{out / MANIFEST_NAME}: not written by this version of launch.precompute_latents; {fix}")
    for name, previous in ((MANIFEST_NAME, manifest and manifest["plan"]), (PLAN_NAME, _read_json(out / PLAN_NAME))):
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


def _remove_outputs(out: Path) -> None:
    for pattern in ("shard-*.array_record", "shard-*.array_record.partial", "shard-*.json", MANIFEST_NAME, PLAN_NAME):
        for path in out.glob(pattern):
            path.unlink()
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """Temporary files of writes that a kill interrupted (atomic JSON writes, a tokenizer being built)."""
    for path in out.glob(".*.tmp"):
        path.unlink(missing_ok=True)
    for path in out.glob(".tokenizer.*"):
        shutil.rmtree(path, ignore_errors=True)


def _shard_finished(out: Path, shard: int, count: int, digest: str) -> bool:
    summary = _read_json(out / shard_summary_name(shard, count))
    path = out / shard_name(shard, count)
    return (summary is not None and summary.get("plan_sha256") == digest and path.is_file()
            and path.stat().st_size == summary.get("bytes"))


def _build_tokenizer(out: Path, dataset: Dataset, section: ml_collections.ConfigDict) -> None:
    """The caption tokenizer from every clip's caption, into OUT/tokenizer (built aside, then renamed)."""
    target = out / TOKENIZER_DIR
    shutil.rmtree(target, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out))
    staging.chmod(default_mode(directory=True))
    build_caption_tokenizer([clip["caption"] for clip in dataset.clips], staging, int(section.vocab_size))
    os.replace(staging, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """One shard: records go to `.partial`, which is renamed once the shard is complete; then its summary."""

    def __init__(self, out: Path, shard: int, layout: ShardLayout, options: str, digest: str):
        self.final = out / shard_name(shard, layout.num_shards)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.summary_path = out / shard_summary_name(shard, layout.num_shards)
        start, stop = layout.bounds(shard)
        self.expected, self.items, self.real_samples, self.digest = stop - start, 0, 0, digest
        self.summary_path.unlink(missing_ok=True)
        self._writer = ArrayRecordWriter(str(self.partial), options)

    def write(self, record: bytes, real_samples: int) -> None:
        self._writer.write(record)
        self.items += 1
        self.real_samples += real_samples

    @property
    def complete(self) -> bool:
        return self.items == self.expected

    def finish(self, sample_rate: int) -> dict[str, Any]:
        self._writer.close()
        fsync_file(self.partial)
        os.replace(self.partial, self.final)
        summary = {"file": self.final.name, "items": self.items, "bytes": self.final.stat().st_size,
                   "sha256": _sha256(self.final), "seconds": self.real_samples / sample_rate,
                   "plan_sha256": self.digest}
        atomic_write_json(self.summary_path, summary)
        return summary


# ------------------------------------------------------------------------------------------------ encoders


@functools.lru_cache(maxsize=8)
def _encode_program(graphdef: Any, sharding: Any, ratio: int, dtype: str, chunk: int, overlap: int,
                    posterior: bool) -> Any:
    """The jit'ed window encoder; cached so repeated runs in one process (benchmarks, tests) compile it once."""

    def encode(state, audio, padding_mask):
        model = nnx.merge(graphdef, state)
        if chunk:
            features = chunked_encode_features(model, audio, chunk_frames=chunk, overlap_frames=overlap)
        else:
            features = model.encode_features(jnp.swapaxes(audio, 1, 2))
        batch, frames = features.shape[:2]
        mask = padding_mask.reshape(batch, frames, ratio).max(axis=-1) > 0  # any real sample makes a frame real
        if posterior:
            mean, std = VAEBottleneck.posterior(features)
            out = {"latent_std": jnp.swapaxes(std, 1, 2).astype(dtype)}
        else:
            mean, out = model.bottleneck.encode(features)[0], {}
        return {"latent_mean": jnp.swapaxes(mean, 1, 2).astype(dtype), "latent_mask": mask, **out}

    return jax.jit(encode, out_shardings=sharding)


class WindowEncoder:
    """Audio windows [B, C, S] + padding mask [B, S] -> latent posterior and frame mask, one jit'ed program on the
    mesh with the batch split along its 'batch' rule."""

    def __init__(self, model: nnx.Module, mesh: jax.sharding.Mesh, rules: Any, config: ml_collections.ConfigDict):
        graphdef, self.state = nnx.split(model)
        self.mesh, self.rules, self.sharding = mesh, tuple(tuple(rule) for rule in rules), batch_sharding(mesh, rules)
        self.posterior = model.config.bottleneck.type == "vae"
        self._encode = _encode_program(graphdef, self.sharding, model.downsampling_ratio, str(config.dtype),
                                       int(config.encode_chunk_frames), int(config.encode_overlap_frames),
                                       self.posterior)

    def __call__(self, audio: np.ndarray, padding_mask: np.ndarray) -> dict[str, jax.Array]:
        with sharding_context(self.mesh, self.rules):
            return self._encode(self.state, jax.device_put(audio, self.sharding),
                                jax.device_put(padding_mask, self.sharding))


class TextFields:
    """Per-shard text fields of each distinct caption: T5 embeddings of the real tokens, or token ids."""

    def __init__(self, config: ml_collections.ConfigDict, out: Path, mesh: jax.sharding.Mesh, rules: Any):
        self.section, self.batch_size = config.text_encoder, int(config.text_batch_size)
        self.dtype = jnp.dtype(config.dtype)
        self.mesh, self.rules = mesh, rules
        if self.section.name == "t5":
            self.encoder, self.tokenizer = load_text_encoder(self.section, nnx.Rngs(0), mesh=mesh, rules=rules)
        else:
            self.encoder, self.tokenizer = None, load_caption_tokenizer(out / TOKENIZER_DIR, self.section.max_length)

    def for_captions(self, captions: list[str]) -> dict[str, dict[str, np.ndarray]]:
        distinct = list(dict.fromkeys(captions))
        if self.encoder is None:
            tokens = self.tokenizer(distinct)
            return {caption: {"prompt_input_ids": tokens["input_ids"][row],
                              "prompt_attention_mask": tokens["attention_mask"][row]}
                    for row, caption in enumerate(distinct)}
        with sharding_context(self.mesh, self.rules):  # the encoder was restored onto this mesh
            table = encode_captions(distinct, self.tokenizer, self.encoder, batch_size=self.batch_size,
                                    dtype=self.dtype)
        fields = {}
        for caption, row in table.index.items():
            real = int(table.mask[row].sum())  # right-padded: the real tokens are a prefix
            fields[caption] = {"prompt_embeddings": table.embeddings[row, :real]}
        return fields


def text_manifest(section: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
    config = to_dict(section)
    if section.name == "t5":
        return {"name": "t5", "id": section.path, "config": config, "max_length": int(section.max_length),
                "embedding_dim": encoder_config_from(section).d_model}
    tokenizer_file = out / TOKENIZER_DIR / "tokenizer.json"
    config["tokenizer_path"] = TOKENIZER_DIR
    return {"name": "embedded", "id": f"caption-bpe-{_sha256(tokenizer_file)[:16]}", "config": config,
            "max_length": int(section.max_length), "tokenizer_path": TOKENIZER_DIR,
            "vocab_size": len(load_caption_tokenizer(out / TOKENIZER_DIR, section.max_length))}


# ------------------------------------------------------------------------------------------------ the stage


class _PendingWindow(grain.transforms.Map):
    """Work entry (global window id, or -1 for the padding that completes a shard's last batch) -> example."""

    def __init__(self, windows: grain.MapDataset, spec: ClipSpec):
        self.windows = windows
        self.padding = {"audio": np.zeros((spec.channels, spec.sample_size), np.float32),
                        "padding_mask": np.zeros(spec.sample_size, np.float32), "seconds_start": np.float32(0),
                        "seconds_total": np.float32(0), "caption": "", "index": np.int64(-1),
                        "offset": np.int64(-1)}

    def map(self, window: int) -> dict[str, Any]:
        example = self.windows[int(window)] if window >= 0 else self.padding
        return {**example, "window": np.int64(window)}


def _check_config(config: ml_collections.ConfigDict, ae: ml_collections.ConfigDict) -> None:
    if config.dtype not in STORAGE_DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    if config.windows_per_shard <= 0:
        raise ConfigError(f"config.windows_per_shard={config.windows_per_shard}: must be positive, e.g. 1024")
    if config.text_encoder.name not in TEXT_MODES:
        raise ConfigError(f"config.text_encoder.name={config.text_encoder.name!r}: expected 't5' or 'embedded'")
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
    text = TextFields(config, out, mesh, rules)
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
                fields = text.for_captions([dataset.clips[windows[w][0]]["caption"] for w in range(start, stop)])
            clip_index = int(batch["index"][row])
            clip = dataset.clips[clip_index]
            real_samples = int(batch["padding_mask"][row].sum())
            record = {key: value[row] for key, value in host.items()}
            record.update(seconds_start=float(batch["seconds_start"][row]),
                          seconds_total=float(batch["seconds_total"][row]), offset=int(batch["offset"][row]),
                          real_samples=real_samples, clip_index=clip_index, window_index=int(window),
                          caption=clip["caption"], license=clip["license"], path=clip["path"], title=clip["title"],
                          artist=clip["artist"], attributes=json.dumps(clip["attributes"], sort_keys=True),
                          **fields[clip["caption"]])
            writer.write(encode_record(record), real_samples)
            written += 1
            progress.update(1)
            if kill_after and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
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


def write_manifest(out: Path, config, plan: dict[str, Any], dataset: Dataset, ref: CheckpointRef) -> dict:
    ae = ref.config.autoencoder
    ratio = downsampling_ratio(ae)
    shards = []
    for shard in range(plan["num_shards"]):
        summary = _read_json(out / shard_summary_name(shard, plan["num_shards"]))
        if summary is None or summary.get("plan_sha256") != plan_sha256(plan):
            raise DataError(f"{out / shard_name(shard, plan['num_shards'])}: not finished after every process was "
                            f"done; re-run launch.precompute_latents on {out}")
        shards.append({key: summary[key] for key in ("file", "items", "sha256", "bytes", "seconds")})
    frames = int(config.data.sample_size) // ratio
    manifest = {
        "format": FORMAT, "version": VERSION,
        "autoencoder": {**plan["autoencoder"], "config": to_dict(ae)},
        "autoencoder_checkpoint": plan["autoencoder"]["checkpoint"],
        "text_encoder": text_manifest(config.text_encoder, out),
        "sample_rate": int(config.data.sample_rate), "sample_size": int(config.data.sample_size),
        "downsampling_ratio": ratio, "latent_rate": config.data.sample_rate / ratio,
        "latent_channels": int(ae.latent_dim), "latent_frames": frames, "latent_shape": [int(ae.latent_dim), frames],
        "dtype": config.dtype, "posterior": ae.bottleneck.type == "vae",
        "num_items": sum(s["items"] for s in shards), "hours": sum(s["seconds"] for s in shards) / 3600.0,
        "shards": shards, "source": dataset.report, "inputs_sha256": plan["inputs_sha256"],
        "windows_per_shard": int(config.windows_per_shard), "config": to_dict(config), "plan": plan,
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


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
        manifest = _read_json(out / MANIFEST_NAME)
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
            _remove_outputs(out)
        _remove_leftovers(out)
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten once the missing shards exist
        atomic_write_json(out / PLAN_NAME, plan)
        if config.text_encoder.name == "embedded" and (status != "resume" or not (out / TOKENIZER_DIR).is_dir()):
            _build_tokenizer(out, dataset, config.text_encoder)
    barrier(f"musicdiff_precompute_{digest[:16]}_planned", 3600)
    owned = layout.owned(process, processes)
    pending = [shard for shard in owned if not _shard_finished(out, shard, layout.num_shards, digest)]
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
    manifest = _read_json(out / MANIFEST_NAME)
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
            "skipped_inputs": dataset.report["skipped"], "nothing_to_do": nothing_to_do}


def _print_summary(summary: dict[str, Any]) -> None:
    skipped = {reason: n for reason, n in summary["skipped_inputs"].items() if n}
    print(f"precompute: {summary['items']} windows ({summary['hours']:.3f} h of audio) in {summary['shards']} shards "
          f"at {summary['workdir']}; this process encoded {summary['windows_encoded']} windows in "
          f"{summary['encode_seconds']:.1f} s ({summary['windows_per_second']:.1f} windows/s) and skipped "
          f"{summary['shards_skipped']} finished shards")
    print("skipped inputs: " + (", ".join(f"{reason}={n}" for reason, n in skipped.items()) if skipped else "none"))


__all__ = ["ShardLayout", "TextFields", "WindowEncoder", "make_plan", "open_dataset", "output_status",
           "precompute_latents", "write_manifest"]

"""Precomputed latents (launch.precompute_latents) read back for diffusion training, evaluation and generation.

Directory layout (OUT = the precompute workdir):

    OUT/shard-PPPPP-of-NNNNN.array_record   window records, shard P of N (written by JAX process P mod processes)
    OUT/shard-PPPPP-of-NNNNN.json           that shard's summary (items, sha256, bytes, seconds), written after it
    OUT/manifest.json                       written last, once every shard is finished (see below)
    OUT/precompute_plan.json                what is being computed (autoencoder fingerprint, inputs, settings)
    OUT/tokenizer/                          embedded text mode only: the caption tokenizer (AutoTokenizer files)

Record schema. Each ArrayRecord record is one window of `sample_size` samples of one clip, serialised as msgpack
(no pickle): a map from field name to a value; arrays are msgpack ext type 1 holding [dtype name, shape, raw
little-endian bytes], dtype one of float32, bfloat16, float16, int32, int64, uint8, bool.

- latent_mean: [C, F] `manifest.dtype`, the VAE posterior mean of the window (C latent channels, F frames per window;
  frames past the clip's end are the encoding of the zero padding)
- latent_std: [C, F] `manifest.dtype`, the posterior std softplus(scale) + 1e-4; present only when
  `manifest.posterior` is true (VAE bottleneck). Deterministic bottlenecks store only latent_mean (the latents).
- latent_mask: [F] bool, True on frames that hold any real (non-padding) sample
- seconds_start: float, floor(offset / sample_rate); seconds_total: float, ceil(clip duration) (SAO's timing)
- offset: int, window start in samples at the model rate; real_samples: int, real (unpadded) samples in the window
- clip_index: int, the clip's position among the usable clips of the scan; window_index: int, the record's global
  position (shard-major, windows of a clip consecutive)
- caption, license, path (relative to the audio folder), title, artist: str; attributes: str (a JSON object)
- text: the fields of the text-encoder kind manifest.text_encoder.name names (musicdiff/models/text_encoder); of the
  built-in kinds, "t5": prompt_embeddings [n, D] `manifest.dtype`, the frozen encoder's output for
  the caption's n real tokens (n <= max_length; positions n.. are padding, zero with mask False on read)
- text, "embedded": prompt_input_ids [max_length] int32 and prompt_attention_mask [max_length] bool from the
  tokenizer in OUT/tokenizer

Manifest keys: format, version, autoencoder {checkpoint, fingerprint, step, config},
autoencoder_checkpoint (the same step directory, absolute), text_encoder {name, id, config, max_length,
embedding_dim (t5) | tokenizer_path, vocab_size (embedded)}, sample_rate, sample_size, downsampling_ratio, latent_rate
(frames per second), latent_shape [C, F], latent_channels, latent_frames, dtype, posterior, num_items, hours, shards
[{file, items, sha256, bytes, seconds}], source {kind, root, usable, skipped}, skipped_windows {changed_since_scan,
non_finite_latents} (windows laid out but not written: their file changed or vanished after the scan, or their
latents were not finite), inputs_sha256, windows_per_shard,
config (the precompute config), plan. `read_manifest` resolves tokenizer_path to an absolute path (also inside
text_encoder.config, so the section can go straight to load_text_encoder).

Training batches (`latent_training_dataset`): latents float32 [B, C, latent_length], a fresh sample
mean + std·ε per example and epoch (ε from Grain's per-element seed, so a restored iterator is exact), randomly
cropped within the real frames when the window is longer, zero-padded and masked when shorter; padding_mask float32
[B, latent_length]; seconds_start (of the crop) and seconds_total float32 [B]; bpm float32 [B] (the clip's
`attributes.bpm`, 0 when it has none) and beat_offset float32 [B] (seconds from the crop's start to a beat: the clip's
`attributes.first_beat`, default 0, minus the crop's start in the clip) for beat-grid conditioning; tonic int32 [B]
(`attributes.tonic_pitch_class`, C = 0) and mode int32 [B] (`attributes.mode`: 0 major, 1 minor), −1 where unknown,
for key conditioning; prompt_embeddings [B, T, D] float32 +
prompt_mask bool [B, T] (t5) or prompt_input_ids int32 [B, T] + prompt_attention_mask bool [B, T] (embedded); caption
(NumPy unicode [B]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for decoding)
import msgpack
import numpy as np

from data_pipelines.grain_pipeline import batch_examples, process_rows, shard_for_process
from musicdiff.errors import DataError
from musicdiff.models.evaluator_labels import MODES
from musicdiff.models.text_encoder import text_encoder_kind

FORMAT = "musicdiff-latents"
VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "precompute_plan.json"
ARRAY_DTYPES = ("float32", "bfloat16", "float16", "int32", "int64", "uint8", "bool")
_ARRAY_EXT = 1


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


def shard_summary_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.json"


# ------------------------------------------------------------------------------------------------ record codec


def _pack_array(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"cannot serialise a {type(value).__name__} in a latent record")
    if value.dtype.name not in ARRAY_DTYPES or value.dtype.byteorder == ">":
        raise TypeError(f"array dtype {value.dtype} is not storable; use one of {', '.join(ARRAY_DTYPES)}")
    payload = [value.dtype.name, list(value.shape), np.ascontiguousarray(value).tobytes()]
    return msgpack.ExtType(_ARRAY_EXT, msgpack.packb(payload, use_bin_type=True))


def _unpack_array(code: int, data: bytes) -> Any:
    if code != _ARRAY_EXT:
        return msgpack.ExtType(code, data)
    name, shape, raw = msgpack.unpackb(data, raw=False)
    if name not in ARRAY_DTYPES:
        raise DataError(f"latent record: unknown array dtype {name!r}")
    return np.frombuffer(raw, dtype=np.dtype(name)).reshape(shape)


def encode_record(fields: dict[str, Any]) -> bytes:
    """Serialises one record (str/int/float/bool values and NumPy arrays); deterministic for equal input."""
    return msgpack.packb(fields, default=_pack_array, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """The fields of one record; arrays are read-only views of `data`."""
    return msgpack.unpackb(data, ext_hook=_unpack_array, raw=False)


# ------------------------------------------------------------------------------------------------ manifest, records


def read_manifest(latents_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished precompute output (DataError naming the directory and the fix otherwise)."""
    directory = Path(latents_dir)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        if (directory / PLAN_NAME).is_file():
            raise DataError(f"{directory}: precompute has not finished (no {MANIFEST_NAME} yet); re-run "
                            f"launch.precompute_latents with --workdir={directory} to resume it")
        raise DataError(f"{directory}: no {MANIFEST_NAME}; create the latents with python -m launch.precompute_latents "
                        f"--workdir={directory}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path}: not a {FORMAT} v{VERSION} manifest (format={manifest.get('format')!r}, "
                        f"version={manifest.get('version')!r}); re-run launch.precompute_latents")
    text = manifest["text_encoder"]
    if text.get("tokenizer_path"):
        tokenizer = str((directory / text["tokenizer_path"]).resolve())
        text["tokenizer_path"] = tokenizer
        text["config"]["tokenizer_path"] = tokenizer
    manifest["directory"] = str(directory.resolve())
    return manifest


def shard_paths(manifest: dict[str, Any]) -> list[str]:
    directory = Path(manifest["directory"])
    paths = [directory / shard["file"] for shard in manifest["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{directory}: shard files missing: {', '.join(missing[:3])}; re-run launch.precompute_latents "
                        f"on it (finished shards are kept)")
    return [str(p) for p in paths]


class LatentRecords:
    """Random access to the decoded records of a precompute output, in window order (picklable for workers)."""

    def __init__(self, latents_dir: str | Path):
        self.manifest = read_manifest(latents_dir)
        self._source = grain.sources.ArrayRecordDataSource(shard_paths(self.manifest))
        if len(self._source) != self.manifest["num_items"]:
            raise DataError(f"{latents_dir}: the shards hold {len(self._source)} records but the manifest says "
                            f"{self.manifest['num_items']}; re-run launch.precompute_latents with overwrite=True")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[int(index)])

    def raw(self) -> grain.sources.ArrayRecordDataSource:
        return self._source


def iterate_records(latents_dir: str | Path, *, arrays: bool = False) -> Iterator[dict[str, Any]]:
    """Every record in window order with `attributes` parsed (for evaluation prompts: caption, attributes,
    seconds_start/total, path, ...); array fields are dropped unless `arrays`."""
    records = LatentRecords(latents_dir)
    for index in range(len(records)):
        record = records[index]
        if not arrays:
            record = {key: value for key, value in record.items() if not isinstance(value, np.ndarray)}
        record["attributes"] = json.loads(record["attributes"])
        yield record


# ------------------------------------------------------------------------------------------------ training pipeline


class DecodeRecord(grain.transforms.Map):
    def map(self, data: bytes) -> dict[str, Any]:
        return decode_record(data)


class CropAndSample(grain.transforms.RandomMap):
    """Record → training example: latent crop/pad to `latent_length`, posterior sample, timing, padded text."""

    def __init__(self, latent_length: int, manifest: dict[str, Any]):
        self.latent_length = int(latent_length)
        self.samples_per_frame = int(manifest["downsampling_ratio"])
        self.sample_rate = int(manifest["sample_rate"])
        self.text_entry = manifest["text_encoder"]
        self.text_kind = text_encoder_kind(self.text_entry["name"], "manifest.json text_encoder.name")

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        mean = np.asarray(record["latent_mean"], np.float32)
        frames_mask = np.asarray(record["latent_mask"], bool)
        channels, frames = mean.shape
        length = self.latent_length
        real = int(frames_mask.sum())
        start = int(rng.integers(0, real - length + 1)) if real > length else 0
        stop = min(frames, start + length)
        latents = mean[:, start:stop]
        if "latent_std" in record:
            std = np.asarray(record["latent_std"], np.float32)[:, start:stop]
            latents = latents + std * rng.standard_normal(latents.shape, dtype=np.float32)
        out_latents = np.zeros((channels, length), np.float32)
        out_latents[:, : stop - start] = latents
        out_mask = np.zeros(length, np.float32)
        out_mask[: stop - start] = frames_mask[start:stop]
        offset = int(record["offset"]) + start * self.samples_per_frame
        attributes = json.loads(record["attributes"]) if record.get("attributes") else {}
        example = {
            "latents": out_latents,
            "padding_mask": out_mask,
            "seconds_start": np.float32(math.floor(offset / self.sample_rate)),
            "seconds_total": np.float32(record["seconds_total"]),
            "bpm": np.float32(attributes.get("bpm", 0.0)),
            "beat_offset": np.float32(float(attributes.get("first_beat", 0.0)) - offset / self.sample_rate),
            "tonic": np.int32(attributes.get("tonic_pitch_class", -1)),
            "mode": np.int32(MODES.index(attributes["mode"]) if attributes.get("mode") in MODES else -1),
            "caption": str(record["caption"]),
        }
        example.update(self.text_kind.record_fields(record, self.text_entry))
        return example


def latent_training_dataset(
    latents_dir: str | Path,
    *,
    latent_length: int,
    batch_size: int,
    seed: int,
    shuffle_seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    read_threads: int = 2,
    num_workers: int = 0,
    batch_rows: Sequence[int] | None = None,
    global_batch_size: int | None = None,
) -> grain.IterDataset:
    """Shuffled (reshuffled every epoch by `shuffle_seed`), repeated (`num_epochs` None: forever), process-sharded
    batches of `batch_size` examples (per process): this process's rows of each global batch
    (grain_pipeline.process_rows: by default the p-th block of P; trainers pass the rows their batch sharding gives
    it). Crops and posterior samples follow `seed` and each example's global position, so P processes together
    produce exactly the global batches one process would, and they differ every epoch.

    Checkpoint with `iterator.get_state()` / `iterator.set_state(state)`; a restored iterator yields the same batches.
    With `num_epochs` set, every process yields the same number of batches (the tail that does not divide evenly is
    dropped), so multi-host steps stay in lockstep.
    """
    if latent_length <= 0 or batch_size <= 0:
        raise DataError(f"latent_length={latent_length}, batch_size={batch_size}: both must be positive")
    rows, global_batch = process_rows(int(batch_size), process_index, process_count, batch_rows, global_batch_size)
    records = LatentRecords(latents_dir)
    if len(records) == 0:
        raise DataError(f"{latents_dir}: holds no records; precompute a non-empty audio folder")
    ds = grain.MapDataset.source(records.raw()).shuffle(seed=int(shuffle_seed)).repeat(num_epochs)
    # Randomness before sharding: each example's seed comes from its global index, not its index on this process.
    ds = ds.map(DecodeRecord()).random_map(CropAndSample(latent_length, records.manifest), seed=int(seed))
    ds = shard_for_process(ds, rows, global_batch)
    return batch_examples(ds, batch_size=int(batch_size), read_threads=read_threads, num_workers=num_workers)


def evaluation_prompts(latents_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per clip (its first window): caption, attributes, seconds_total, path, license, clip_index."""
    seen: set[int] = set()
    prompts = []
    for record in iterate_records(latents_dir):
        if record["clip_index"] in seen:
            continue
        seen.add(record["clip_index"])
        prompts.append({key: record[key] for key in ("caption", "attributes", "seconds_total", "path", "license",
                                                      "clip_index")})
    return prompts


__all__ = ["LatentRecords", "decode_record", "encode_record", "evaluation_prompts", "iterate_records",
           "latent_training_dataset", "read_manifest", "shard_name", "shard_paths", "shard_summary_name"]

"""The audio-folder format: `ROOT/manifest.jsonl` plus audio files, validated into usable items and counted skips.

Each manifest line is a JSON object with `path` (relative to ROOT), `caption`, `license` (SPDX id) and optionally
`attributes` (object), `title`, `artist`. Every line ends up either usable or skipped under exactly one reason from
`SKIP_REASONS`, checked in this order:

- bad_manifest_line: not UTF-8, not JSON, not a JSON object, or `attributes` not an object
- missing_field: `path` or `caption` absent or not a non-empty string
- license_missing / license_not_allowed: the licence is absent, or not in the allowlist (SPDX ids compare
  case-insensitively and are kept in the allowlist's spelling); a missing licence is never allowed
- path_escapes_root: absolute, `..` leading outside ROOT, or a symlink resolving outside ROOT
- duplicate_path: the same file listed again (the first listing is kept)
- missing_file, empty_file (zero bytes)
- unreadable_audio: libsndfile cannot open it (not audio, unknown format)
- truncated: the header promises more audio than the file holds, or decoding fails or stops part-way
- too_short: shorter than `min_seconds`
- non_finite: a NaN or Inf sample; silent: peak below `silence_threshold_db` dBFS
- caption_filtered: the caption contains none of `caption_include` (when given) or one of `caption_exclude`
  (case-insensitive substrings): a selection rather than a fault, e.g. one instrument's clips for fine-tuning

Other sample rates and channel counts are usable: the pipeline resamples and applies the channel policy. NaN and silence
need every sample, so each file is fully decoded once (in blocks, on a thread pool; libsndfile releases the GIL) and the
result is cached in memory by (path, size, mtime). Each skipped line is logged once per process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import soundfile

from musicdiff.audio.io import AudioInfo, read_info
from musicdiff.errors import ConfigError, DataError
from musicdiff.files import atomic_write_json

MANIFEST_NAME = "manifest.jsonl"
DEFAULT_LICENSE_ALLOWLIST = ("CC0-1.0", "CC-BY-3.0", "CC-BY-4.0")
DEFAULT_SILENCE_THRESHOLD_DB = -60.0
DEFAULT_MIN_SECONDS = 1.0
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
SKIP_REASONS = (
    "bad_manifest_line", "missing_field", "license_missing", "license_not_allowed", "path_escapes_root",
    "duplicate_path", "missing_file", "empty_file", "unreadable_audio", "truncated", "too_short", "non_finite",
    "silent", "caption_filtered",
)
_DECODE_BLOCK = 1 << 18
_DECODE_ERRORS = (RuntimeError, OSError, ValueError, EOFError, struct.error)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioItem:
    """One usable manifest entry. `path` is the real (symlink-free) absolute path and `relpath` that path relative to
    the root; levels are of the whole source file over all its channels."""

    path: str
    relpath: str
    caption: str
    license: str
    attributes: dict[str, Any]
    title: str | None
    artist: str | None
    sample_rate: int
    channels: int
    frames: int
    peak_db: float
    rms_db: float
    manifest_line: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class SkippedEntry:
    line: int
    path: str | None
    reason: str
    detail: str


@dataclass(frozen=True)
class ScanResult:
    root: str
    items: tuple[AudioItem, ...]
    skipped_entries: tuple[SkippedEntry, ...]
    unlisted: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> int:
        return len(self.items)

    @property
    def skipped(self) -> dict[str, int]:
        """Count per reason, every reason present (zeros included) so the keys are stable."""
        counts = dict.fromkeys(SKIP_REASONS, 0)
        for entry in self.skipped_entries:
            counts[entry.reason] += 1
        return counts

    @property
    def hours(self) -> float:
        return sum(item.duration for item in self.items) / 3600.0

    def report(self) -> dict[str, Any]:
        rates: dict[str, int] = {}
        channels: dict[str, int] = {}
        for item in self.items:
            rates[str(item.sample_rate)] = rates.get(str(item.sample_rate), 0) + 1
            channels[str(item.channels)] = channels.get(str(item.channels), 0) + 1
        return {
            "root": self.root,
            "usable": self.usable,
            "skipped": self.skipped,
            "skipped_total": len(self.skipped_entries),
            "hours": self.hours,
            "sample_rates": rates,
            "channels": channels,
            "skipped_files": [vars(entry) for entry in self.skipped_entries],
            "unlisted_audio_files": len(self.unlisted),
        }

    def table(self) -> str:
        """The human summary launch.inspect_data prints: usable clips, each skip reason, hours, unlisted files."""
        rows = [("usable", str(self.usable))]
        rows += [(f"skipped: {reason}", str(count)) for reason, count in self.skipped.items()]
        rows += [("hours (usable)", f"{self.hours:.4f}"), ("audio files not in the manifest", str(len(self.unlisted)))]
        width = max(len(name) for name, _ in rows)
        lines = [f"audio folder {self.root}"] + [f"  {name:<{width}}  {value:>8}" for name, value in rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class _FileCheck:
    """What decoding found, independent of thresholds; reason is unreadable_audio, truncated, non_finite or None."""

    reason: str | None
    detail: str
    info: AudioInfo | None = None
    peak_db: float = -200.0
    rms_db: float = -200.0


_FILE_CHECKS: dict[tuple[str, int, int], _FileCheck] = {}
_LOGGED: set[tuple[str, str, int, str | None, str]] = set()
_LOG_LOCK = threading.Lock()


def scan_settings() -> dict[str, Any]:
    """The default scan thresholds, keys of `config.data` in every stage that reads an audio folder."""
    return dict(license_allowlist=DEFAULT_LICENSE_ALLOWLIST, silence_threshold_db=DEFAULT_SILENCE_THRESHOLD_DB,
                min_seconds=DEFAULT_MIN_SECONDS, caption_include=(), caption_exclude=())


def audio_folder_data(**fields: Any) -> ml_collections.ConfigDict:
    """`config.data` of a stage that reads an audio folder (configs/audio_folder.py documents the keys): the shared
    defaults, with `fields` changing some of them or adding the stage's own keys."""
    data = dict(
        root="",
        sample_rate=44100,
        sample_size=131072,  # 2.97 s at 44.1 kHz, 64 * 2048
        channels=2,
        **scan_settings(),
        normalize="none",
        random_crop=True,
        num_workers=0,
        read_threads=2,
    )
    data.update(fields)
    return ml_collections.ConfigDict(data)


def data_root(config: ml_collections.ConfigDict) -> Path:
    """The folder to read: the top-level `root` alias when set (for `--config.root=ROOT`), else `data.root`."""
    root = config.get("root", "") or config.data.get("root", "")
    if not root:
        raise ConfigError(f"config.data.root is empty: pass the audio folder as {root_flag(config)}=ROOT")
    return Path(root)


def root_flag(config: ml_collections.ConfigDict) -> str:
    """The command-line flag that names the audio folder in this stage's config."""
    return "--config.root" if "root" in config else "--config.data.root"


def scan(config: ml_collections.ConfigDict) -> ScanResult:
    """Validates the folder named by `config` (see `data_root`) with the settings of `config.data`."""
    data = config.data
    return scan_folder(
        data_root(config),
        license_allowlist=tuple(data.license_allowlist),
        silence_threshold_db=float(data.silence_threshold_db),
        min_seconds=float(data.min_seconds),
        root_flag=root_flag(config),
        caption_include=tuple(data.get("caption_include", ())),
        caption_exclude=tuple(data.get("caption_exclude", ())),
    )


def inspect_folder(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """Scans the folder `config` names, prints the table and writes WORKDIR/data_report.json; returns the report.
    Bad files are counted, never fatal."""
    result = scan(config)
    print(result.table())
    report = result.report()
    atomic_write_json(Path(workdir) / "data_report.json", report)
    return report


def scan_folder(
    root: str | os.PathLike,
    *,
    license_allowlist: Iterable[str] = DEFAULT_LICENSE_ALLOWLIST,
    silence_threshold_db: float = DEFAULT_SILENCE_THRESHOLD_DB,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_threads: int | None = None,
    root_flag: str = "--config.data.root",
    caption_include: Iterable[str] = (),
    caption_exclude: Iterable[str] = (),
) -> ScanResult:
    """Reads and validates `root/manifest.jsonl`; never raises for bad entries, only for a missing folder/manifest."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass an audio folder as {root_flag}=ROOT")
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest}: missing; an audio folder needs a {MANIFEST_NAME} with one JSON object a line")
    real_root = root.resolve()
    allowed = {name.lower(): name for name in license_allowlist}  # lower-case id -> the allowlist's spelling
    include = [word.lower() for word in caption_include]
    exclude = [word.lower() for word in caption_exclude]

    skipped: list[SkippedEntry] = []
    candidates: list[tuple[int, dict[str, Any], Path]] = []
    accepted: set[Path] = set()
    mentioned: set[Path] = set()  # every path the manifest names, to count audio files it leaves out
    for line_no, raw in enumerate(manifest.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        entry, reason, detail = _parse_line(raw, allowed)
        if reason is None:
            reason, detail = _caption_selection(entry["caption"], include, exclude)
        path_text = entry.get("path") if isinstance(entry, dict) and isinstance(entry.get("path"), str) else None
        try:
            resolved = _resolve_inside(real_root, path_text) if path_text else None
        except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a name the OS refuses
            resolved = None
            if reason is None:
                reason, detail = "missing_file", f"cannot resolve the path: {_first_line(err)}"
        if reason is None:
            if resolved is None:
                reason, detail = "path_escapes_root", "resolves outside the root"
            elif resolved in accepted:
                reason, detail = "duplicate_path", "listed on an earlier line"
            else:
                accepted.add(resolved)
                candidates.append((line_no, entry, resolved))
        if path_text is not None:
            mentioned.add(Path(os.path.normpath(real_root / path_text)))
        if resolved is not None:
            mentioned.add(resolved)
        if reason is not None:
            skipped.append(SkippedEntry(line_no, path_text, reason, detail))

    threads = max_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        checks = list(pool.map(lambda c: _check_file(c[2], min_seconds, silence_threshold_db), candidates))

    items: list[AudioItem] = []
    for (line_no, entry, resolved), check in zip(candidates, checks):
        if check.reason is not None:
            skipped.append(SkippedEntry(line_no, entry["path"], check.reason, check.detail))
            continue
        items.append(_make_item(entry, resolved, real_root, check, line_no))
    skipped.sort(key=lambda s: s.line)
    for entry in skipped:
        _log_once(manifest, entry)
    result = ScanResult(str(root), tuple(items), tuple(skipped), _unlisted(real_root, mentioned))
    log.info("%s: %d usable (%.3f h), %d skipped", root, result.usable, result.hours, len(skipped))
    return result


def _caption_selection(caption: str, include: list[str], exclude: list[str]) -> tuple[str | None, str]:
    text = caption.lower()
    if include and not any(word in text for word in include):
        return "caption_filtered", f"the caption names none of caption_include {include}"
    hit = next((word for word in exclude if word in text), None)
    if hit is not None:
        return "caption_filtered", f"the caption names {hit!r} (caption_exclude)"
    return None, ""


def _parse_line(raw: bytes, allowed: dict[str, str]) -> tuple[dict[str, Any] | None, str | None, str]:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, "bad_manifest_line", f"not JSON: {err}"
    if not isinstance(entry, dict):
        return None, "bad_manifest_line", f"a JSON {type(entry).__name__}, not an object"
    if "attributes" in entry and not isinstance(entry["attributes"], (dict, type(None))):
        return entry, "bad_manifest_line", "'attributes' is not an object"
    for key in ("path", "caption"):
        if not isinstance(entry.get(key), str) or not entry[key].strip() or "\x00" in entry[key]:
            return entry, "missing_field", f"no valid '{key}' string"
    licence = entry.get("license")
    if licence is None or (isinstance(licence, str) and not licence.strip()):
        return entry, "license_missing", "no 'license'"
    if not isinstance(licence, str) or licence.strip().lower() not in allowed:
        return entry, "license_not_allowed", f"license {licence!r} is not in the allowlist"
    return {**entry, "license": allowed[licence.strip().lower()]}, None, ""


def _resolve_inside(real_root: Path, relative: str) -> Path | None:
    """The real path of `relative` when it stays inside the root (after following symlinks), else None."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        return None
    resolved = (real_root / relative).resolve()
    return resolved if resolved.is_relative_to(real_root) else None


def _check_file(path: Path, min_seconds: float, silence_threshold_db: float) -> _FileCheck:
    """The file's verdict under the thresholds; decoding is cached by (path, size, mtime)."""
    try:
        stat = path.stat()
    except OSError:
        return _FileCheck("missing_file", "no such file")
    if not path.is_file():
        return _FileCheck("missing_file", "not a regular file")
    if stat.st_size == 0:
        return _FileCheck("empty_file", "zero bytes")
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    decoded = _FILE_CHECKS.get(key)
    if decoded is None:
        decoded = _FILE_CHECKS[key] = _decode_check(path, stat.st_size)
    if decoded.reason in ("unreadable_audio", "truncated"):
        return decoded
    seconds = decoded.info.duration if decoded.info.sample_rate > 0 else 0.0
    if seconds < min_seconds:
        return _FileCheck("too_short", f"{seconds:.3f} s < min_seconds={min_seconds}")
    if decoded.reason is not None:
        return decoded
    if decoded.peak_db < silence_threshold_db:
        return _FileCheck("silent", f"peak {decoded.peak_db:.1f} dBFS < silence_threshold_db={silence_threshold_db}")
    return decoded


def _decode_check(path: Path, size: int) -> _FileCheck:
    try:
        info = read_info(path)
    except _DECODE_ERRORS as err:
        return _FileCheck("unreadable_audio", _first_line(err))
    if info.format in ("WAV", "WAVEX") and _wav_truncated(path, size):
        return _FileCheck("truncated", "the WAV header declares more data than the file holds", info)
    peak, sum_squares, decoded = 0.0, 0.0, 0
    try:
        with soundfile.SoundFile(path) as f:
            for block in f.blocks(blocksize=_DECODE_BLOCK, dtype="float32", always_2d=True):
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    where = (decoded + int(np.argmin(finite))) / max(info.sample_rate, 1)
                    return _FileCheck("non_finite", f"NaN or Inf at second {where:.3f}", info)
                peak = max(peak, float(np.max(np.abs(block))) if block.size else 0.0)
                sum_squares += float(np.sum(np.square(block, dtype=np.float64)))
                decoded += len(block)
    except _DECODE_ERRORS as err:
        return _FileCheck("truncated", f"decoding failed after {decoded} frames: {_first_line(err)}", info)
    if decoded < info.frames:
        return _FileCheck("truncated", f"decoded {decoded} of {info.frames} frames", info)
    mean_square = sum_squares / max(1, decoded * info.channels)
    peak_level = 20.0 * math.log10(peak) if peak > 0 else -200.0
    rms_level = 10.0 * math.log10(mean_square) if mean_square > 0 else -200.0
    return _FileCheck(None, "", info, peak_level, rms_level)


def _wav_truncated(path: Path, size: int) -> bool:
    """Whether a RIFF/WAVE file's data chunk runs past the end of the file (libsndfile silently shortens those)."""
    with open(path, "rb") as handle:
        header = handle.read(12)
        if len(header) < 12 or header[:4] not in (b"RIFF", b"RIFX") or header[8:12] != b"WAVE":
            return False  # RF64, W64 and others: not checked here
        order = "<" if header[:4] == b"RIFF" else ">"
        position = 12
        while position + 8 <= size:
            handle.seek(position)
            chunk_id, chunk_size = struct.unpack(order + "4sI", handle.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):
                    return False  # written as a stream, size never filled in
                return position + 8 + chunk_size > size
            position += 8 + chunk_size + (chunk_size & 1)
    return True


def _make_item(entry: dict[str, Any], resolved: Path, real_root: Path, check: _FileCheck, line_no: int) -> AudioItem:
    info = check.info
    optional = {key: entry[key] if isinstance(entry.get(key), str) else None for key in ("title", "artist")}
    return AudioItem(
        path=str(resolved), relpath=resolved.relative_to(real_root).as_posix(), caption=entry["caption"].strip(),
        license=entry["license"].strip(), attributes=dict(entry.get("attributes") or {}), **optional,
        sample_rate=info.sample_rate, channels=info.channels, frames=info.frames, peak_db=check.peak_db,
        rms_db=check.rms_db, manifest_line=line_no,
    )


def _unlisted(real_root: Path, listed: set[Path]) -> tuple[str, ...]:
    found = []
    for directory, _, names in os.walk(real_root):
        for name in names:
            path = Path(directory, name)
            if path.suffix.lower() in AUDIO_SUFFIXES and path not in listed and path.resolve() not in listed:
                found.append(path.relative_to(real_root).as_posix())
    return tuple(sorted(found))


def _log_once(manifest: Path, entry: SkippedEntry) -> None:
    key = (str(manifest), entry.reason, entry.line, entry.path, entry.detail)
    with _LOG_LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    # A caption filter is a selection, not a fault: counted in the report, logged at debug level only.
    level = logging.DEBUG if entry.reason == "caption_filtered" else logging.WARNING
    log.log(level, "skipped %s line %d (%s): %s - %s", manifest, entry.line, entry.path, entry.reason, entry.detail)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

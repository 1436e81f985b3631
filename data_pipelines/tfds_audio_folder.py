"""A TFDS builder for the audio-folder format, written as ArrayRecord and read back through Grain, without TensorFlow.

Build (only the usable items of a scan are written, with the same validation as launch.inspect_data):

    python -m data_pipelines.tfds_audio_folder --root=ROOT --data_dir=OUT
    build_array_record(ROOT, OUT)            # from Python: builder.download_and_prepare(file_format="array_record")

(`tfds build` itself cannot run without TensorFlow: its CLI module imports tf.train at start-up. With TensorFlow
installed, `tfds build data_pipelines/tfds_audio_folder.py --manual_dir=ROOT --file_format=array_record` works too.)

Each example keeps the source file's encoded bytes (`audio_file`: WAV/FLAC/OGG/MP3 as found, so nothing is re-encoded
and FLAC stays compressed) plus the manifest fields and the header and level values the pipeline needs. Read it with
`open_tfds_source(dataset_dir)`, a Grain RandomAccessDataSource of the same clip records as
grain_pipeline.AudioFolderSource, so `training_dataset` / `window_dataset` apply the same transforms.

TensorFlow stays out: features are only Tensor/Scalar/Text, which TFDS encodes and decodes with NumPy, and ArrayRecord
reading goes through `as_data_source` (not `as_dataset`, which needs tf.data).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines.audio_folder import (
    DEFAULT_LICENSE_ALLOWLIST,
    DEFAULT_MIN_SECONDS,
    DEFAULT_SILENCE_THRESHOLD_DB,
    ScanResult,
    scan_folder,
)
from musicdiff.errors import DataError


class MusicdiffAudioFolder(tfds.core.GeneratorBasedBuilder):
    """An audio folder (manifest.jsonl + audio files) as one 'train' split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded source files with manifest fields, header values and whole-file levels."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the audio folder (the directory holding manifest.jsonl) as --manual_dir."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup touches importlib_resources, which tensorflow-datasets only installs for Python < 3.9.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        root: str | os.PathLike | None = None,
        license_allowlist: tuple[str, ...] = DEFAULT_LICENSE_ALLOWLIST,
        silence_threshold_db: float = DEFAULT_SILENCE_THRESHOLD_DB,
        min_seconds: float = DEFAULT_MIN_SECONDS,
        **kwargs: Any,
    ):
        self._root = root
        self._scan_settings = dict(license_allowlist=tuple(license_allowlist),
                                   silence_threshold_db=float(silence_threshold_db), min_seconds=float(min_seconds))
        self.scan_result: ScanResult | None = None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned, licence-checked music clips from a musicdiff audio folder.",
            features=tfds.features.FeaturesDict({
                "audio_file": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes
                "path": text,
                "caption": text,
                "license": text,
                "title": text,
                "artist": text,
                "attributes": text,  # JSON object
                "sample_rate": tfds.features.Scalar(dtype=np.int32),
                "channels": tfds.features.Scalar(dtype=np.int32),
                "frames": tfds.features.Scalar(dtype=np.int64),
                "peak_db": tfds.features.Scalar(dtype=np.float32),
                "rms_db": tfds.features.Scalar(dtype=np.float32),
            }),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = self._root if self._root is not None else dl_manager.manual_dir
        self.scan_result = scan_folder(root, **self._scan_settings)
        if not self.scan_result.items:
            raise DataError(f"{root}: no usable clips to build; run launch.inspect_data on it to see why")
        return {"train": self._generate_examples(self.scan_result)}

    def _generate_examples(self, result: ScanResult):
        for item in result.items:
            yield item.relpath, {
                "audio_file": Path(item.path).read_bytes(),
                "path": item.relpath,
                "caption": item.caption,
                "license": item.license,
                "title": item.title or "",
                "artist": item.artist or "",
                "attributes": json.dumps(item.attributes, sort_keys=True),
                "sample_rate": item.sample_rate,
                "channels": item.channels,
                "frames": item.frames,
                "peak_db": item.peak_db,
                "rms_db": item.rms_db,
            }


def build_array_record(
    root: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    license_allowlist: tuple[str, ...] = DEFAULT_LICENSE_ALLOWLIST,
    silence_threshold_db: float = DEFAULT_SILENCE_THRESHOLD_DB,
    min_seconds: float = DEFAULT_MIN_SECONDS,
) -> Path:
    """Builds the folder's 'train' split as ArrayRecord under `data_dir`; returns the dataset directory."""
    builder = MusicdiffAudioFolder(
        root=root, license_allowlist=license_allowlist, silence_threshold_db=silence_threshold_db,
        min_seconds=min_seconds, data_dir=os.fspath(data_dir), file_format="array_record",
    )
    builder.download_and_prepare(file_format="array_record")
    return Path(builder.data_dir)


class TfdsAudioSource:
    """Grain RandomAccessDataSource of clip records (see grain_pipeline) over a TFDS ArrayRecord split."""

    def __init__(self, data_source: Any):
        self._data_source = data_source

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _clip_record(self._data_source[int(index)], int(index))

    def __repr__(self) -> str:
        return f"TfdsAudioSource({self._data_source!r})"

    def metadata(self, index: int) -> dict[str, Any]:
        """The manifest fields of a record (attributes parsed back from JSON)."""
        example = self._data_source[int(index)]
        fields = {key: _text(example[key]) for key in ("path", "caption", "license", "title", "artist")}
        return {**fields, "attributes": json.loads(_text(example["attributes"]))}

    def clip_lengths(self) -> list[tuple[int, int]]:
        """(frames, sample_rate) of every record; reads each record once (ArrayRecord has no column access)."""
        examples = (self._data_source[index] for index in range(len(self)))
        return [(int(example["frames"]), int(example["sample_rate"])) for example in examples]


def open_tfds_source(dataset_dir: str | os.PathLike, split: str = "train") -> TfdsAudioSource:
    """The split of a built dataset (the directory `build_array_record` returns), as clip records."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "dataset_info.json").is_file():
        raise DataError(f"{dataset_dir}: no dataset_info.json; build it first with build_array_record or tfds build")
    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    return TfdsAudioSource(builder.as_data_source(split))


def _clip_record(example: dict[str, Any], index: int) -> dict[str, Any]:
    return dict(audio=bytes(example["audio_file"]), caption=_text(example["caption"]), frames=int(example["frames"]),
                sample_rate=int(example["sample_rate"]), peak_db=float(example["peak_db"]),
                rms_db=float(example["rms_db"]), index=index)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build an audio folder as a TFDS ArrayRecord dataset (no TensorFlow).")
    parser.add_argument("--root", required=True, help="the audio folder (holding manifest.jsonl)")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write to")
    parser.add_argument("--min_seconds", type=float, default=DEFAULT_MIN_SECONDS)
    parser.add_argument("--silence_threshold_db", type=float, default=DEFAULT_SILENCE_THRESHOLD_DB)
    parser.add_argument("--license_allowlist", default=",".join(DEFAULT_LICENSE_ALLOWLIST), help="comma-separated")
    args = parser.parse_args(argv)
    allowlist = tuple(name.strip() for name in args.license_allowlist.split(",") if name.strip())
    try:
        print(build_array_record(args.root, args.data_dir, license_allowlist=allowlist, min_seconds=args.min_seconds,
                                 silence_threshold_db=args.silence_threshold_db))
    except DataError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()

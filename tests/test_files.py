"""musicdiff.files: every atomic write leaves the old file or the new one, never a temporary beside it."""

import json
import os
import stat

import pytest

from musicdiff.files import (atomic_directory, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text,
                             default_mode)


def test_writes_replace_the_target_with_plain_permissions(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    atomic_write_json(target, {"b": 1, "a": 2})
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    atomic_write_text(target, "é\n")
    assert target.read_bytes() == "é\n".encode("utf-8")
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(os.stat(target).st_mode) == default_mode()
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_failed_writer_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "clip.wav"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["clip.wav"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "tokenizer"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "vocab.json").write_text("{}")
            raise RuntimeError("copy failed")
    assert os.listdir(tmp_path) == []
    with atomic_directory(target) as staging:
        (staging / "vocab.json").write_text("{}")
    assert os.listdir(tmp_path) == ["tokenizer"] and (target / "vocab.json").read_text() == "{}"

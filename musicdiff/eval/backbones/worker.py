"""Running a backbone engine in another Python environment (OpenL3's TensorFlow pins do not install beside JAX).

The parent writes the prepared clips as `.npy` files plus `request.json` into a temporary directory and runs
`PYTHON -m musicdiff.eval.backbones.worker DIR` with this repository on PYTHONPATH. The worker imports only
numpy and the engine's own packages: it builds the engine named in the request ("module:Class" plus keyword
arguments), analyses the clips, embeds the prompts, writes one `.npz` per clip (and `text.npy`), then
`done.json`. An engine failure is written to `error.txt` and the exit status is 3; the parent raises it as
MissingBackbone (for missing packages/weights) or as a RuntimeError with the worker's message.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[3]


def resolve_engine(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class WorkerEngine:
    """The parent's side: same analyze / embed_text as an engine, each call one worker process."""

    def __init__(self, python: str, engine: str, kwargs: dict[str, Any], timeout_s: float | None = None):
        self.python, self.engine, self.kwargs, self.timeout_s = python, engine, dict(kwargs), timeout_s
        if not Path(python).expanduser().exists():
            from musicdiff.eval.backbones.external import MissingBackbone

            raise MissingBackbone(f"worker python {python}: no such interpreter; pass the python of the environment "
                                  f"where the backbone's package is installed (see docs/evaluation.md)")

    def _run(self, clips: Sequence[np.ndarray], prompts: Sequence[str]) -> tuple[list[dict[str, np.ndarray]],
                                                                                   np.ndarray | None]:
        with tempfile.TemporaryDirectory(prefix="musicdiff_worker_") as tmp:
            folder = Path(tmp)
            for index, clip in enumerate(clips):
                np.save(folder / f"clip_{index:06d}.npy", np.asarray(clip, np.float32))
            (folder / "request.json").write_text(json.dumps(dict(engine=self.engine, kwargs=self.kwargs,
                                                                 clips=len(clips), prompts=list(prompts))))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(_REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            proc = subprocess.run([str(Path(self.python).expanduser()), "-m", "musicdiff.eval.backbones.worker",
                                   str(folder)], env=env, capture_output=True, text=True, timeout=self.timeout_s)
            error = folder / "error.txt"
            if proc.returncode != 0 or not (folder / "done.json").is_file():
                from musicdiff.eval.backbones.external import MissingBackbone

                message = error.read_text() if error.is_file() else (proc.stderr.strip().splitlines() or ["?"])[-1]
                kind = message.split(":", 1)[0]
                first = message.splitlines()[0] if message else "no output"
                if kind == "MissingBackbone":
                    raise MissingBackbone(first.split(": ", 1)[1])
                raise RuntimeError(f"backbone worker ({self.python} {self.engine}) failed: {first}")
            results = []
            for index in range(len(clips)):
                with np.load(folder / f"out_{index:06d}.npz", allow_pickle=False) as data:
                    results.append({name: data[name] for name in data.files})
            text = np.load(folder / "text.npy", allow_pickle=False) if prompts else None
        return results, text

    def analyze(self, clips: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        return self._run(clips, [])[0]

    def embed_text(self, prompts: Sequence[str]) -> np.ndarray:
        return self._run([], prompts)[1]


def serve(folder: Path) -> int:
    """The worker's side: answers the request in `folder` (see the module docstring)."""
    request = json.loads((folder / "request.json").read_text())
    try:
        engine = resolve_engine(request["engine"])(**request["kwargs"])
        clips = [np.load(folder / f"clip_{i:06d}.npy", allow_pickle=False) for i in range(request["clips"])]
        for index, result in enumerate(engine.analyze(clips) if clips else []):
            np.savez(folder / f"out_{index:06d}.npz", **{k: np.asarray(v) for k, v in result.items()})
        if request["prompts"]:
            np.save(folder / "text.npy", np.asarray(engine.embed_text(request["prompts"]), np.float64))
    except Exception as err:  # reported to the parent, which raises it with this message
        first = str(err).splitlines()[0] if str(err) else ""
        (folder / "error.txt").write_text(f"{type(err).__name__}: {first}\n{traceback.format_exc()}")
        return 3
    (folder / "done.json").write_text("{}")
    return 0


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))

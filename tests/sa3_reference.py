"""The Stable Audio 3 reference code for parity tests: `tests/reference/sa3/stable_audio_3`, the model, inference
and LoRA modules of Stability-AI/stable-audio-3 at commit 636f906fc0ee54b3f06edf974dc7d3aa99d6841b (MIT licence,
tests/reference/sa3/LICENSE), copied unmodified. The package is on no index and CI cannot clone it, so the files
travel with the tests; tests/reference/sa3/README.md says what was left out and why.

    sa3 = import_reference()        # the `stable_audio_3` package (torch from the dev extra)
    sa3.factory.create_autoencoder_from_config(...)
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path
from types import ModuleType

REFERENCE_ROOT = Path(__file__).parent / "reference" / "sa3"
# What the parity tests use; importing them up front also loads model.py's dependencies once.
_MODULES = ("factory", "models.autoencoders", "models.bottleneck", "models.conditioners", "models.dit",
            "models.diffusion", "models.inpainting", "models.transformer", "models.lora", "inference.sampling",
            "inference.distribution_shift", "loading_utils")


def import_reference() -> ModuleType:
    """The reference package with its submodules loaded. Its import-time notices (no flash-attn: the SDPA
    fallbacks run, spec §13) are swallowed."""
    if str(REFERENCE_ROOT) not in sys.path:
        sys.path.insert(0, str(REFERENCE_ROOT))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        package = importlib.import_module("stable_audio_3")
        for name in _MODULES:
            importlib.import_module(f"stable_audio_3.{name}")
    if Path(package.__file__).resolve().parent != (REFERENCE_ROOT / "stable_audio_3").resolve():
        raise ImportError(f"stable_audio_3 was imported from {package.__file__}, not the vendored copy in "
                          f"{REFERENCE_ROOT}: uninstall the other copy")
    return package

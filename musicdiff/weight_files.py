"""Tensors read from weight files written elsewhere (Stable Audio checkpoints, adapter files, Hugging Face models).

Every reader passes each tensor through `checked_cast` before it becomes a parameter: the tensor is cast to the
model's parameter dtype (float16 and bfloat16 files import exactly into float32, every half-precision value being a
float32 value) and refused, by file and tensor name, if any value is NaN or infinite, so a damaged or diverged file
never converts silently. `rounding_step` is the relative precision of a stored dtype, for readers that compare a
stored value with one computed in float32.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from musicdiff.errors import DataError


def checked_cast(array: Any, dtype: Any, *, file: str, key: str) -> np.ndarray:
    """`array` as numpy `dtype`, refused with a DataError naming `file` and `key` if a value is NaN or infinite (in
    the file, or after the cast because it lies beyond `dtype`'s range)."""
    stored = np.asarray(array)
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        cast = stored.astype(dtype, copy=False)
    bad = ~np.isfinite(cast)
    if not bad.any():
        return cast
    values = stored[bad]
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    overflow = int(bad.sum()) - nan - inf
    found = ", ".join(f"{count} {kind}" for count, kind in
                      ((nan, "NaN"), (inf, "inf"), (overflow, f"beyond the range of {np.dtype(dtype).name}")) if count)
    advice = (f"load it with a wider parameter dtype than {np.dtype(dtype).name}" if not nan + inf else
              "the file is damaged or was saved from a diverged run: re-export it from a checkpoint whose weights are "
              "finite")
    raise DataError(f"{file}: tensor {key} ({stored.dtype.name}, shape {stored.shape}) holds non-finite values "
                    f"({found} of {stored.size}); {advice}")


def rounding_step(dtype: Any) -> float:
    """The relative spacing of `dtype`'s values (its machine epsilon: 9.8e-4 for float16, 7.8e-3 for bfloat16,
    1.2e-7 for float32); 0 for integer and boolean dtypes, which store values exactly."""
    try:
        return float(ml_dtypes.finfo(dtype).eps)
    except ValueError:
        return 0.0


__all__ = ["checked_cast", "rounding_step"]


def read_safetensors(path: Any, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as stored, metadata) of a safetensors file; a damaged one is a DataError naming `what` and `path`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise DataError(f"{what} {path}: not a readable safetensors file ({error})") from None

"""Removes torchaudio's compiled extensions, which PyPI builds against CUDA torch and which cannot load next to the
CPU torch of the dev extra. torchaudio then imports in its pure-Python mode (it checks whether the libraries exist);
stable-audio-tools only needs `torchaudio.transforms` at import time. Run by `make test` after the reference install.
"""

import importlib.util
import sys
from pathlib import Path


def main() -> int:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        print("torchaudio is not installed; nothing to strip", file=sys.stderr)
        return 1
    lib_dir = Path(spec.origin).parent / "lib"
    for library in sorted(lib_dir.glob("*.so")):
        library.unlink()
        print(f"removed {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

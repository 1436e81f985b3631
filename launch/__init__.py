"""Thin command-line shells over musicdiff's stages: `python -m launch.<stage> --config=... --workdir=...`."""

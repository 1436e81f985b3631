"""What every CLI shares: `--config=FILE[:ARG]`, `--config.a.b=VALUE` overrides, `--workdir`, one-line errors."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import app, flags

from musicdiff.config import load_config, to_dict, validate
from musicdiff.errors import ConfigError, DataError

flags.DEFINE_string("workdir", None, "Output directory of this stage.")

Stage = Callable[[ml_collections.ConfigDict, Path], object]


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Separates `--config=...` and `--config.k=v` from the other flags."""
    spec, overrides, rest = None, [], []
    for arg in argv:
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return spec, overrides, rest


def run(stage: Stage, default_config: str | None = None, needs_devices: bool = True) -> None:
    """Parses flags, loads and validates the config, writes it to the workdir and runs the stage."""
    spec, overrides, rest = split_config_args(sys.argv)
    def parse(argv: list[str]) -> list[str]:
        return flags.FLAGS(argv)

    def main(_argv: list[str]) -> None:
        logging.getLogger().setLevel(logging.INFO)
        try:
            chosen = spec or default_config
            if chosen is None:
                raise ConfigError("--config is required, e.g. --config=configs/diffusion.py:tiny")
            config = load_config(chosen, overrides)
            if flags.FLAGS.workdir is None:
                raise ConfigError("--workdir is required: the directory this stage writes to")
            if needs_devices:
                import jax

                validate(config, jax.device_count())
            else:
                validate(config, None)
            workdir = Path(flags.FLAGS.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
            stage(config, workdir)
        except (ConfigError, DataError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=rest, flags_parser=parse)

"""python -m launch.merge_adapters --checkpoint=BASE_RUN --adapters=FILE[:STRENGTH],... --workdir=OUT

Folds weight adapters (launch.train_lora's WORKDIR/adapter.safetensors) into the base diffusion checkpoint's weights
and writes the result as a new checkpoint (musicdiff/convert/merge.py).
"""

from __future__ import annotations

import sys

from absl import app, flags

import launch.common  # noqa: F401  (defines --workdir)
from musicdiff.errors import ConfigError, DataError

flags.DEFINE_string("checkpoint", None, "The base diffusion run (workdir, checkpoints dir or step dir).")
flags.DEFINE_string("adapters", "", "FILE[:STRENGTH],... merged in order (strength 1 by default).")
flags.DEFINE_bool("use_ema", True, "Merge into the base's EMA weights when it has them.")
FLAGS = flags.FLAGS


def main(_argv: list[str]) -> None:
    from musicdiff.checkpoints import CheckpointError
    from musicdiff.convert.merge import merge_into_checkpoint
    from musicdiff.models.weight_adapters import parse_adapter_specs

    try:
        if not FLAGS.checkpoint or not FLAGS.workdir:
            raise ConfigError("pass --checkpoint=BASE_RUN and --workdir=OUT")
        out = merge_into_checkpoint(FLAGS.checkpoint, parse_adapter_specs(FLAGS.adapters), FLAGS.workdir,
                                    use_ema=FLAGS.use_ema)
        print(f"merged checkpoint: {out}")
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

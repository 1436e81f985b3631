"""Compiled peak memory of one training step: full fine-tuning vs weight-adapter (LoRA) training at the :sao DiT shape.

    python -m bench.lora_memory [--batch=4] [--rank=16] [--kinds=lora,dora,lora_xs]

Both rows are the project's own trainers' steps (training/diffusion.py DiffusionTrainer.train_step and
training/lora.py LoraTrainer, the same function with the adapter folded in), lowered for one device with abstract
inputs and compiled; nothing runs. XLA's memory analysis gives the bytes of the step's arguments (the train state and
the batch), outputs, and temporaries (activations, gradients, optimiser temporaries); since the state is donated
(outputs alias arguments), the peak a device holds is arguments + temporaries. Shapes: configs/diffusion.py:sao
(1.06 B parameters, bf16 compute, every block rematerialised), `--batch` clips of 1024 latent frames per device (SAO's
batch 32 over 8 devices is 4) with 128 cached T5 tokens. Full fine-tuning keeps fp32 weights, their EMA and AdamW's two
moments; the adapter run keeps the base in bf16 (`lora.base_dtype`), the adapter, its EMA and moments in fp32.
Writes bench/results/lora_memory-<host>-<date>.json and .md. The numbers are the XLA:CPU compiler's; a GPU or TPU
compiler lays out temporaries differently, so compare the rows with each other, not with a device's capacity.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

from musicdiff.checkpoints import path_name
from musicdiff.config import load_config
from musicdiff.models.weight_adapters import trainable
from musicdiff.files import atomic_write_bytes, atomic_write_json
from musicdiff.parallel import mesh_and_rules
from musicdiff.parallel.sharding import sharding_context
from musicdiff.training.diffusion import DiffusionTrainer
from musicdiff.training.lora import LoraTrainer

REPO = Path(__file__).resolve().parents[1]
flags.DEFINE_integer("batch", 4, "Clips per device.")
flags.DEFINE_integer("rank", 16, "Adapter rank.")
flags.DEFINE_string("kinds", "lora", "Adapter kinds to measure, comma-separated (lora, dora, lora_xs).")
FLAGS = flags.FLAGS
FRAMES, TOKENS = 1024, 128


def sao_config(batch: int):
    return load_config(str(REPO / "configs" / "diffusion.py") + ":sao",
                       [f"batch_size={batch}", "mesh.data=1", "training.cfg_dropout_prob=0.1"])


def abstract_batch(config, batch: int) -> dict:
    shape = jax.ShapeDtypeStruct
    return {"latents": shape((batch, int(config.model.io_channels), FRAMES), jnp.float32),
            "padding_mask": shape((batch, FRAMES), jnp.float32),
            "seconds_start": shape((batch,), jnp.float32), "seconds_total": shape((batch,), jnp.float32),
            "prompt_embeddings": shape((batch, TOKENS, 768), jnp.float32), "prompt_mask": shape((batch, TOKENS), bool)}


def step_memory(trainer, config, batch: int) -> dict:
    """Bytes of the compiled step for one device (arguments, outputs, temporaries) and the state's parameter count."""
    mesh, rules = mesh_and_rules(config, jax.devices()[:1])
    with sharding_context(mesh, rules):
        state = jax.eval_shape(trainer.init_state, jax.random.key(0))
        compiled = jax.jit(trainer.train_step, donate_argnums=0).lower(state, abstract_batch(config, batch)).compile()
    analysis = compiled.memory_analysis()
    sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp")}
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype")
                      and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
    if "adapter" in state["params"]:  # the adapter's trained tensors (LoRA-XS's frozen bases are stored, not trained)
        flat = jax.tree_util.tree_flatten_with_path(state["params"]["adapter"])[0]
        trained = sum(x.size for path, x in flat if trainable(path_name(path)))
    else:
        trained = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {**sizes, "peak_bytes": sizes["argument"] + sizes["temp"], "state_bytes": int(state_bytes),
            "trained_values": int(trained)}


def main(_argv) -> None:
    batch = FLAGS.batch
    rows = {}
    full = sao_config(batch)
    rows["full fine-tuning (fp32 weights + EMA + AdamW)"] = step_memory(DiffusionTrainer(full), full, batch)
    for kind in [k for k in FLAGS.kinds.split(",") if k]:
        config = sao_config(batch)
        config.unlock()
        config.trainer = "lora"
        config.lora = dict(kind=kind, rank=FLAGS.rank, alpha=0.0, include=("model/*",), exclude=(),
                           base_dtype="bfloat16")
        rows[f"{kind} rank {FLAGS.rank}, bf16 base"] = step_memory(LoraTrainer(config), config, batch)
    baseline = rows[next(iter(rows))]["peak_bytes"]
    gib = 2.0 ** 30
    lines = [f"# Training-step memory at the :sao DiT shape ({batch} clips x {FRAMES} frames per device)", "",
             f"XLA:CPU memory analysis of the compiled step on {jax.devices()[0].device_kind}, "
             f"{datetime.date.today()}; peak = arguments + temporaries (the state is donated).", "",
             "| training | trained values | state GiB | arguments GiB | temporaries GiB | peak GiB | peak vs full |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['trained_values']:,} | {row['state_bytes'] / gib:.2f} | "
                     f"{row['argument'] / gib:.2f} | {row['temp'] / gib:.2f} | {row['peak_bytes'] / gib:.2f} | "
                     f"{row['peak_bytes'] / baseline:.2f}x |")
    out = REPO / "bench" / "results" / f"lora_memory-{socket.gethostname()}-{datetime.date.today()}"
    atomic_write_json(out.with_suffix(".json"), {"batch_per_device": batch, "frames": FRAMES, "rows": rows})
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)

"""Random-weight checkpoints in the layout trainers write (for tests of the stages that read checkpoints)."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from flax import nnx

from musicdiff.config import load_config
from musicdiff.models import registry
from musicdiff.models.text_encoder import build_caption_tokenizer
from musicdiff.checkpoints import Checkpointer

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["an upbeat track in A minor at 128 BPM with plucked bass and drums",
            "a calm piano piece in C major at 80 BPM", "warm pads and organ in D minor at 100 BPM"]


def save_checkpoint(directory: Path, state: dict, config: ml_collections.ConfigDict, step: int = 0) -> Path:
    with Checkpointer(Path(directory) / "checkpoints", save_interval_steps=1, async_save=False) as ckpt:
        ckpt.save(step, state, config=config, force=True)
    return Path(directory)


def random_autoencoder(directory: Path, overrides=(), seed: int = 0, step: int = 0) -> Path:
    """A randomly initialised `:tiny` autoencoder saved the way its trainer saves it."""
    config = load_config(str(REPO / "configs" / "autoencoder.py") + ":tiny", list(overrides))
    model = registry.build(config.autoencoder, nnx.Rngs(seed))
    return save_checkpoint(directory, {"params": {"autoencoder": nnx.state(model, nnx.Param)}}, config, step)


def random_diffusion(directory: Path, autoencoder_dir: Path, overrides=(), seed: int = 0,
                     randomize_outputs: bool = True) -> Path:
    """A tiny DiT + conditioner with the embedded prompt encoder and a caption tokenizer in directory/tokenizer.

    `randomize_outputs` re-draws the zero-initialised branch outputs so the model's output depends on its inputs."""
    directory = Path(directory)
    tokenizer = build_caption_tokenizer(CAPTIONS, directory / "tokenizer", vocab_size=300)
    config = load_config(str(REPO / "configs" / "diffusion.py") + ":tiny", [f"autoencoder_checkpoint={autoencoder_dir}",
                                                      f"prompt_encoder.tokenizer_path={tokenizer}", *overrides])
    state = {}
    for index, section in enumerate(("model", "conditioner")):
        module = registry.build(config[section], nnx.Rngs(seed + index))
        params = nnx.state(module, nnx.Param)
        if randomize_outputs:
            key = jax.random.key(seed + 10 + index)
            leaves, treedef = jax.tree.flatten(params)
            keys = jax.random.split(key, len(leaves))
            leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.05 if not x.any() else x for k, x in zip(keys, leaves)]
            params = jax.tree.unflatten(treedef, leaves)
        state[section] = params
    return save_checkpoint(directory, {"params": state}, config)


def diffusion_step_on_one_device(config: ml_collections.ConfigDict):
    """(trainer, initial state, jit'ed train step) of the diffusion trainer on one device. The step does not
    donate its input, so tests may start several runs from the same initial state."""
    from musicdiff.parallel import mesh_and_rules
    from musicdiff.parallel.sharding import sharding_context
    from musicdiff.training import loop
    from musicdiff.training.diffusion import DiffusionTrainer

    mesh, rules = mesh_and_rules(config, jax.devices()[:1])
    trainer = DiffusionTrainer(config)
    state, _ = loop.init_state(trainer.init_state, mesh, rules, jax.random.key(0))

    @jax.jit
    def step(state, batch):
        with sharding_context(mesh, rules):
            return trainer.train_step(state, batch)

    return trainer, state, step

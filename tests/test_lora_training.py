"""The "lora" trainer through the shared runner: a frozen base, an adapter that trains, resumes bit-exactly, encodes an
audio folder with the base's tokenizer, and an adapter file that the generator loads."""

import filecmp
import json

import jax
import numpy as np
import pytest

from musicdiff.checkpoints import find_checkpoint, flatten_with_names, load_model, restore_params_only
from musicdiff.config import load_config
from musicdiff.models.weight_adapters import read_adapter
from musicdiff.training.runner import train
from tests.model_fixtures import REPO

BASE_STEPS = 2
MESH = ["mesh.data=2", "mesh.fsdp=4"]


@pytest.fixture(scope="module")
def base_run(tiny_latents, tmp_path_factory):
    """A 2-step tiny diffusion run on the shared tiny latents (FSDP-sharded, as the adapter runs are)."""
    workdir = tmp_path_factory.mktemp("base")
    config = load_config(str(REPO / "configs" / "diffusion.py") + ":tiny",
                         [f"data.latents={tiny_latents}", f"training.num_steps={BASE_STEPS}", "training.log_every=1",
                          f"training.checkpoint_every={BASE_STEPS}", *MESH])
    train(config, workdir, default_trainer="diffusion")
    return workdir


def lora_config(base_run, *overrides):
    return load_config(str(REPO / "configs" / "lora.py"),
                       [f"init_from={base_run}", "batch_size=8", "training.log_every=1", "lora.rank=2",
                        "lora.include=('model/*', 'conditioner/*')", "training.learning_rate=1e-2", *MESH,
                        *overrides])


def _flat_named(tree):
    return {name: np.asarray(value) for name, value in flatten_with_names(tree)[0].items()}


def stored(workdir, subtree, like):
    ref = find_checkpoint(workdir)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
    return restore_params_only(ref.step_dir, target, subtree=subtree)


@pytest.mark.slow
def test_adapter_trains_on_a_frozen_base_and_resumes_bit_exactly(base_run, tiny_latents, tmp_path):
    base_ref = find_checkpoint(base_run)
    base = {name: load_model(base_ref, name) for name in ("model", "conditioner")}  # the EMA the run starts from
    args = [f"data.latents={tiny_latents}", "training.num_steps=4", "training.checkpoint_every=2"]
    train(lora_config(base_run, *args), tmp_path / "straight")

    from flax import nnx

    base_params = {name: nnx.state(module, nnx.Param) for name, module in base.items()}
    for name, want_tree in base_params.items():  # params/{model, conditioner} after 4 steps: untouched
        frozen = stored(tmp_path / "straight", f"params/{name}", want_tree)
        for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(want_tree)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    config, adapter, metadata = read_adapter(tmp_path / "straight" / "adapter.safetensors")
    assert config.rank == 2 and metadata["step"] == "4"
    b_norms = [np.abs(v).max() for k, v in _flat_named(adapter).items() if k.endswith("lora_b")]
    assert min(b_norms) > 0  # every layer's B left zero: the adapter trained everywhere it was put
    assert any(k.startswith("conditioner/") for k in _flat_named(adapter))

    # The optimiser holds state for the adapter alone: Adam's two moments of every trained value, no more.
    opt_values = _opt_state_values(tmp_path / "straight")
    trained = sum(v.size for v in _flat_named(adapter).values())
    assert opt_values == 2 * trained

    # Generating from the adapter run gives its base with the adapter (EMA) folded in: the whole path from the
    # trainer's checkpoint to the sampler's weights.
    from musicdiff.inference.generate import Generator
    from musicdiff.models.weight_adapters import load_adapter, merge_adapters

    generator = Generator.from_checkpoint(str(tmp_path / "straight"))
    entry, weights = load_adapter(tmp_path / "straight" / "adapter.safetensors", base)
    expected = merge_adapters(base_params, [entry], [weights])
    for got, want in zip(jax.tree.leaves(generator.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)

    # 2 steps, then a resumed run to 4, equals 4 straight.
    train(lora_config(base_run, *args[:1], "training.num_steps=2", "training.checkpoint_every=2"),
          tmp_path / "resumed")
    train(lora_config(base_run, *args), tmp_path / "resumed")
    _, resumed, _ = read_adapter(tmp_path / "resumed" / "adapter.safetensors")
    for name, value in _flat_named(adapter).items():
        np.testing.assert_array_equal(_flat_named(resumed)[name], value)


@pytest.mark.slow
def test_audio_folder_is_encoded_with_the_base_tokenizer_and_caption_filter(base_run, tiny_latents, tmp_path):
    source = json.loads((tiny_latents / "manifest.json").read_text())["config"]["data"]["root"]
    config = lora_config(base_run, f"data.audio={source}", "data.caption_exclude=('piano',)",
                         "training.num_steps=1", "training.checkpoint_every=1", "lora.kind=lora_xs")
    train(config, tmp_path / "run")
    latents = tmp_path / "run" / "latents"
    assert filecmp.cmp(latents / "tokenizer" / "tokenizer.json", base_run / "tokenizer" / "tokenizer.json",
                       shallow=False)
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["source"]["skipped"]["caption_filtered"] > 0
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def _opt_state_values(workdir):
    """Values of Adam's moments (mu, nu) stored in the checkpoint's optimiser state."""
    import ast

    from musicdiff.checkpoints import stored_names

    total = 0
    for name, description in stored_names(find_checkpoint(workdir).step_dir).items():
        parts = name.split("/")
        if parts[0] == "opt_state" and ("mu" in parts or "nu" in parts):
            total += int(np.prod(ast.literal_eval(description.rsplit(" ", 1)[0])))
    return total

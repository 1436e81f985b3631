"""Weight adapters through generation: strength 0 is the base, a noise-level interval covering every step equals the
adapter folded into the weights, an empty one leaves the denoiser alone, and a merged export samples like the
unmerged stack (the whole path: file -> generator -> sampler, and file -> merged checkpoint -> generator)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.inference.batch_generation import generate_to_folder
from musicdiff.inference.generate import Generator, SamplerSettings
from musicdiff.models.weight_adapters import AdapterConfig, find_targets, init_adapter, save_adapter
from tests.model_fixtures import random_autoencoder, random_diffusion
from tests.test_generation import LATENT_LENGTH, gen_config

SETTINGS = SamplerSettings(sampler="ddim", steps=3, cfg_scale=3.0)
PROMPTS, SECONDS, SEEDS = ["a calm piano piece", "warm pads"], [0.3, 0.3], [0, 1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    diffusion = random_diffusion(root / "dit", random_autoencoder(root / "ae"), [f"data.latent_length={LATENT_LENGTH}"])
    base = Generator.from_checkpoint(str(diffusion))
    modules = {name: nnx.merge(base.graphdefs[name], base.params[name]) for name in ("model", "conditioner")}
    files = {}
    for name, config in {"both": AdapterConfig("lora", rank=2, include=("model/*", "conditioner/*")),
                         "dit": AdapterConfig("dora", rank=2, include=("model/transformer/*",))}.items():
        weights = init_adapter(jax.random.key(0), config, find_targets(modules, config), base.params)
        leaves, treedef = jax.tree.flatten(weights)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        weights = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        files[name] = save_adapter(root / f"{name}.safetensors", config, weights)
    return diffusion, base, files


def sample(generator):
    return np.asarray(generator.sample_latents(PROMPTS, SECONDS, SETTINGS, SEEDS))


def with_adapters(diffusion, specs, interval=(0.0, float("inf"))):
    generator = Generator.from_checkpoint(str(diffusion))
    generator.load_adapters(specs, interval)
    return generator


@pytest.mark.slow
def test_strength_interval_and_merge_through_generation(setup, tmp_path):
    diffusion, base, files = setup
    plain = sample(base)
    np.testing.assert_array_equal(sample(with_adapters(diffusion, [(files["both"], 0.0)])), plain)
    folded = sample(with_adapters(diffusion, [(files["both"], 1.0), (files["dit"], 0.5)]))
    assert np.max(np.abs(folded - plain)) > 1e-3
    # Every step's noise level lies in [1e-6, 1e9]: the per-step path equals the folded one.
    timed = sample(with_adapters(diffusion, [(files["both"], 1.0), (files["dit"], 0.5)], (1e-6, 1e9)))
    np.testing.assert_allclose(timed, folded, atol=1e-5 * np.max(np.abs(folded)))
    # No step lies in [1e-8, 1e-7]: a DiT-only adapter then leaves the samples as they were.
    never = sample(with_adapters(diffusion, [(files["dit"], 1.0)], (1e-8, 1e-7)))
    np.testing.assert_allclose(never, plain, atol=1e-6 * np.max(np.abs(plain)))

    merged = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "launch.merge_adapters", f"--checkpoint={diffusion}",
                             f"--adapters={files['both']}:1.0,{files['dit']}:0.5", f"--workdir={merged}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(sample(Generator.from_checkpoint(str(merged))), folded,
                               atol=1e-5 * np.max(np.abs(folded)))

    records = generate_to_folder(gen_config(diffusion, prompt="x", seconds_total=0.3, batch_size=1,
                                            adapters=f"{files['dit']}:0.5"), tmp_path / "out")
    assert records[0]["adapters"] == [{"path": str(files["dit"]), "strength": 0.5, "kind": "dora", "rank": 2}]


def test_an_adapter_for_another_model_is_refused(setup, tmp_path):
    diffusion, base, _ = setup
    config = AdapterConfig("lora", rank=2, include=("model/transformer/project_in",))
    weights = {"model": {"transformer": {"project_in": {"lora_a": jnp.zeros((2, 63)), "lora_b": jnp.zeros((64, 2))}}}}
    path = save_adapter(tmp_path / "bad.safetensors", config, weights)
    from musicdiff.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model/transformer/project_in/lora_a has shape \(2, 63\)"):
        with_adapters(diffusion, [(path, 1.0)])

"""Generation stage: WAV lengths, metadata, per-clip seeds, audio-to-audio, inpainting, clear errors."""

import json
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile

from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.inference.batch_generation import generate_to_folder, plan_clips
from musicdiff.inference.generate import Generator, SamplerSettings, mask_from_spans
from tests.model_fixtures import random_autoencoder, random_diffusion

LATENT_LENGTH = 64  # 64 frames x 256 samples = 0.37 s windows of the tiny autoencoder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    autoencoder = random_autoencoder(root / "ae")
    diffusion = random_diffusion(root / "dit", autoencoder, [f"data.latent_length={LATENT_LENGTH}"])
    return diffusion, autoencoder


@pytest.fixture(scope="module")
def generator(checkpoints):
    return Generator.from_checkpoint(str(checkpoints[0]))


def gen_config(checkpoint, **overrides):
    config = load_config("configs/generate.py:demo", [f"checkpoint={checkpoint}", "steps=4", "batch_size=3"])
    config.unlock()
    config.update(overrides)
    return config


def test_wav_lengths_follow_seconds_total_and_metadata_is_complete(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    wanted = [0.1, 0.25, 0.37, 0.05]
    prompts.write_text("".join(json.dumps({"prompt": f"clip {i}", "seconds_total": s, "attributes": {"bpm": 90 + i}})
                               + "\n" for i, s in enumerate(wanted)))
    out = tmp_path / "out"
    records = generate_to_folder(gen_config(checkpoints[0], prompts_file=str(prompts)), out)
    assert [r["file"] for r in records] == ["000.wav", "001.wav", "002.wav", "003.wav"]
    for record, seconds in zip(records, wanted):
        info = soundfile.info(out / record["file"])
        assert info.samplerate == 44100 and info.channels == 2
        assert info.frames == round(seconds * 44100)
        assert (out / record["file"]).with_suffix(".png").is_file()
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert lines == records
    for key in ("prompt", "seed", "sampler", "steps", "cfg_scale", "seconds_total", "wall_time", "compile_seconds"):
        assert key in lines[0]
    assert lines[2]["attributes"] == {"bpm": 92} and lines[1]["seed"] == 1
    assert all(line["wall_time"] > 0 for line in lines)


def test_a_clip_depends_on_its_seed_only(generator):
    settings = SamplerSettings(sampler="dpmpp-3m-sde", steps=3, cfg_scale=3.0, sigma_min=0.05, sigma_max=20.0)
    alone = generator.sample_latents(["a calm piano piece"], [0.3], settings, [7])
    batched = generator.sample_latents(["warm pads", "a calm piano piece"], [0.2, 0.3], settings, [3, 7])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(batched[1]), atol=1e-5)
    other = generator.sample_latents(["a calm piano piece"], [0.3], settings, [8])
    assert float(jnp.max(jnp.abs(other - alone))) > 1e-2


def test_prompt_and_cfg_change_the_output(generator):
    settings = SamplerSettings(sampler="ddim", steps=3, cfg_scale=1.0)
    a = generator.sample_latents(["a calm piano piece"], [0.3], settings, [0])
    b = generator.sample_latents(["plucked bass and drums"], [0.3], settings, [0])
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    guided = generator.sample_latents(["a calm piano piece"], [0.3],
                                      SamplerSettings(sampler="ddim", steps=3, cfg_scale=5.0), [0])
    assert float(jnp.max(jnp.abs(guided - a))) > 1e-3


def test_negative_prompt_through_the_generator(generator, checkpoints, tmp_path):
    """A negative prompt equal to the prompt makes guidance a no-op (cond = uncond), so any scale gives the
    conditional model's sample; another negative prompt changes the sample, per row, and the record keeps it."""
    prompts, seconds, seeds = ["a calm piano piece", "warm pads"], [0.3, 0.3], [0, 1]
    settings = SamplerSettings(sampler="ddim", steps=3, cfg_scale=6.0)
    plain = generator.sample_latents(prompts, seconds, SamplerSettings(sampler="ddim", steps=3, cfg_scale=1.0), seeds)
    same = generator.sample_latents(prompts, seconds, settings, seeds, negative_prompts=prompts)
    np.testing.assert_allclose(np.asarray(same), np.asarray(plain), rtol=1e-4, atol=1e-4)
    guided = generator.sample_latents(prompts, seconds, settings, seeds)
    steered = generator.sample_latents(prompts, seconds, settings, seeds, negative_prompts=["loud drums", ""])
    assert float(jnp.max(jnp.abs(steered[0] - guided[0]))) > 1e-3
    np.testing.assert_allclose(np.asarray(steered[1]), np.asarray(guided[1]), rtol=1e-5, atol=1e-5)
    records = generate_to_folder(gen_config(checkpoints[0], prompt="a calm piano piece",
                                            negative_prompt="loud drums", cfg_sigma_min=0.1, seconds_total=0.3,
                                            batch_size=1),
                                 tmp_path / "out")
    assert records[0]["negative_prompt"] == "loud drums" and records[0]["cfg_sigma_min"] == 0.1
    assert "cfg_sigma_max" not in records[0]


def test_projected_guidance_through_the_generator(generator, checkpoints, tmp_path):
    """APG keeping the whole parallel part is CFG moved from the model output to x0 (the same line, as the
    parameterisations are affine in the output); dropping it changes the sample."""
    prompts, seconds, seeds = ["a calm piano piece", "warm pads"], [0.3, 0.3], [0, 1]
    cfg = generator.sample_latents(prompts, seconds, SamplerSettings(sampler="ddim", steps=3, cfg_scale=6.0), seeds)
    whole = generator.sample_latents(prompts, seconds, SamplerSettings(sampler="ddim", steps=3, cfg_scale=6.0,
                                                                       guidance="apg", apg_parallel=1.0), seeds)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(cfg), rtol=1e-4, atol=1e-4)
    projected = generator.sample_latents(prompts, seconds, SamplerSettings(sampler="ddim", steps=3, cfg_scale=6.0,
                                                                           guidance="apg"), seeds)
    assert float(jnp.max(jnp.abs(projected - cfg))) > 1e-3
    records = generate_to_folder(gen_config(checkpoints[0], prompt="x", guidance="apg", apg_norm_threshold=2.0,
                                            seconds_total=0.3, batch_size=1), tmp_path / "apg")
    assert records[0]["guidance"] == "apg" and records[0]["apg_norm_threshold"] == 2.0
    with pytest.raises(ConfigError, match="cfg_rescale"):
        SamplerSettings(guidance="apg", cfg_rescale=0.7)
    with pytest.raises(ConfigError, match="guidance"):
        SamplerSettings(guidance="pag")


def test_inpainting_keeps_the_unmasked_latents(generator):
    frame_rate = generator.sample_rate / generator.ratio
    mask = mask_from_spans("0.1:0.2", generator.window_seconds, generator.latent_length, frame_rate)
    assert mask.sum() > 0 and mask.sum() < len(mask)
    known = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, LATENT_LENGTH)), jnp.float32)
    settings = SamplerSettings(sampler="dpmpp-2m", steps=4, cfg_scale=1.0, sigma_min=0.05, sigma_max=10.0)
    out = generator.sample_latents(["x"], [0.3], settings, [0], inpaint=(known, jnp.asarray(mask)[None, None]))
    keep = mask == 0
    np.testing.assert_array_equal(np.asarray(out)[..., keep], np.asarray(known)[..., keep])
    assert float(jnp.max(jnp.abs(out[..., ~keep] - known[..., ~keep]))) > 1e-2


def test_init_latents_need_a_positive_noise_level(generator):
    """Audio-to-audio through the library with no noise level raises instead of silently ignoring the init."""
    init = jnp.zeros((1, 64, LATENT_LENGTH), jnp.float32)
    with pytest.raises(ConfigError, match="init_noise_level"):
        generator.sample_latents(["x"], [0.3], SamplerSettings(sampler="euler", steps=2), [0], init=init)


def test_audio_to_audio_and_inpaint_cli(checkpoints, tmp_path):
    source = tmp_path / "source.wav"
    t = np.arange(int(0.37 * 44100)) / 44100
    soundfile.write(source, np.stack([np.sin(2 * np.pi * 220 * t)] * 2, 1) * 0.3, 44100)
    out = tmp_path / "a2a"
    cmd = [sys.executable, "-m", "launch.generate", "--config=configs/generate.py:demo",
           f"--config.checkpoint={checkpoints[0]}", "--config.prompt=variation", "--config.steps=3",
           "--config.seconds_total=0.3", f"--config.init_audio={source}", "--config.init_noise_level=2.0",
           "--config.batch_size=1", f"--workdir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "generations.jsonl").read_text())
    assert record["init_noise_level"] == 2.0 and soundfile.info(out / "000.wav").frames == round(0.3 * 44100)

    records = generate_to_folder(gen_config(checkpoints[0], prompt="fill", inpaint_audio=str(source), mask="0.1:0.2",
                                            seconds_total=0.3, batch_size=1), tmp_path / "inpaint")
    assert records[0]["inpainting"] == "repaint_fallback" and "not trained" in records[0]["inpainting_note"]


def test_clear_errors(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="seconds_total"):
        generate_to_folder(gen_config(checkpoints[0], prompt="x", seconds_total=5.0), tmp_path / "long")
    with pytest.raises(ConfigError, match="exactly one"):
        plan_clips(ml_collections.ConfigDict(dict(prompt="", prompts_file="", num_per_prompt=1, seconds_total=1.0,
                                                  seconds_start=0.0, seed=0)))
    with pytest.raises(ConfigError, match="sampler"):
        SamplerSettings(sampler="k-lms")
    with pytest.raises(ConfigError, match="ddpm"):
        generate_to_folder(gen_config(checkpoints[0], prompt="x", sampler="ddpm", seconds_total=0.3), tmp_path / "ddpm")
    # Audio-to-audio with no positive noise level is a config error, not a silent text-to-audio run.
    with pytest.raises(ConfigError, match="init_noise_level"):
        SamplerSettings(sampler="euler", init_noise_level=0.0)
    source = tmp_path / "init.wav"
    soundfile.write(source, np.zeros((int(0.37 * 44100), 2), np.float32), 44100)
    with pytest.raises(ConfigError, match="init_noise_level"):
        generate_to_folder(gen_config(checkpoints[0], prompt="x", seconds_total=0.3, init_audio=str(source),
                                      init_noise_level=0.0), tmp_path / "a2a")
    done = subprocess.run([sys.executable, "-m", "launch.generate", "--config.checkpoint=/no/such/run",
                           "--config.prompt=x", f"--workdir={tmp_path / 'missing'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "/no/such/run" in done.stderr


def test_rematerialised_models_sample_and_decode_inside_loops(unsharded):
    """Checkpointed blocks (remat) of a DiT merged outside the sampler loop, and of an autoencoder inside the chunked
    decoder's lax.map, must run: nnx.remat raised TraceContextError there."""
    import jax
    from flax import nnx

    from musicdiff.inference.generate import make_sampler
    from musicdiff.models import registry
    from musicdiff.models.chunking import chunked_decode
    from musicdiff.training.diffusion import DiffusionTrainer

    config = load_config("configs/diffusion.py:tiny", ["model.remat=full"])
    trainer = DiffusionTrainer(config)
    params = trainer.init_params(jax.random.key(0))
    sample_fn = make_sampler(trainer.graphdefs, config.objective, SamplerSettings(sampler="ddim", steps=2, cfg_scale=3.0),
                             (1, 64, 16))
    inputs = {"prompt": {"input_ids": jnp.ones((1, 32), jnp.int32), "attention_mask": jnp.ones((1, 32), bool)},
              "seconds_start": jnp.zeros(1), "seconds_total": jnp.ones(1)}
    assert bool(jnp.all(jnp.isfinite(jax.jit(sample_fn)(params, inputs, jax.random.key(1)))))
    ae_config = load_config("configs/autoencoder.py:tiny", ["autoencoder.remat=True"])
    autoencoder = registry.build(ae_config.autoencoder, nnx.Rngs(0))
    latents = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 40)), jnp.float32)
    audio = chunked_decode(autoencoder, latents, chunk_frames=16, overlap_frames=4)
    assert audio.shape == (1, 2, 40 * 256) and bool(jnp.all(jnp.isfinite(audio)))

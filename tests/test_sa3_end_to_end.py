"""Stable Audio 3 end to end on the embedded CC0 set, through the stages' own entry points (what launch.prepare_data,
launch.train_autoencoder, launch.precompute_latents, launch.train_diffusion and launch.generate call): a tiny SAME
autoencoder (configs/autoencoder.py:same_tiny) trains, its latents are precomputed, a tiny SA3 DiT
(configs/diffusion.py:sa3_tiny) trains on them with variable-length batches and the inpainting input, then generates a
clip shorter than its window and inpaints a span of a rendered clip."""

import json
import time

import numpy as np
import pytest
import soundfile

from musicdiff.config import load_config, validate
from musicdiff.metrics import read_metrics
from tests.autoencoder_fixtures import render_folder

RATE = 44100
CLIPS, CLIP_SECONDS = 6, 0.25  # 11,025 samples: windows of 64, 64 and 45 latent frames (172 real + 44 = 45)
WINDOW_FRAMES = 64  # the DiT's window: 64 frames x 64 samples (same_tiny: patch 16 x stride 4) = 0.093 s
MIN_SECONDS = "data.min_seconds=0.1"


def stage(spec, *overrides):
    """A stage's config as its CLI loads and checks it (launch.common.run)."""
    import jax

    config = load_config(spec, list(overrides))
    validate(config, jax.device_count())
    return config


@pytest.mark.usefixtures("devices")
def test_same_and_sa3_dit_train_generate_and_inpaint_end_to_end(tmp_path, measurement):
    from data_pipelines.latent_source import read_manifest
    from musicdiff.checkpoints import find_checkpoint, load_model
    from musicdiff.inference.batch_generation import generate_to_folder
    from musicdiff.inference.precompute import precompute_latents
    from musicdiff.training.runner import train

    began = time.perf_counter()
    audio = render_folder(tmp_path / "audio", clips=CLIPS, seconds=CLIP_SECONDS)

    # 1. SAME autoencoder: a few reconstruction (warm-up) steps through the runner.
    ae_dir = tmp_path / "autoencoder"
    ae = stage("configs/autoencoder.py:same_tiny", f"data.root={audio}", MIN_SECONDS, "data.heldout_fraction=0.0", "batch_size=8",
               "training.num_steps=2", "training.warmup_steps=2", "training.warmup_mode=full",
               "training.checkpoint_every=2", "training.demo_every=0", "training.log_every=1",
               "training.stft_fft_sizes=(256, 64)", "discriminator.n_ffts=(256,)", "discriminator.filters=4")
    train(ae, ae_dir, default_trainer="autoencoder")
    ae_losses = [row["loss"] for row in read_metrics(ae_dir / "metrics.jsonl")]
    assert len(ae_losses) == 2 and np.all(np.isfinite(ae_losses)), ae_losses
    print("ae", time.perf_counter() - began)

    # 2. Latents of every window with the SAME encoder (no posterior: the softnorm bottleneck's latents).
    latents = tmp_path / "latents"
    precompute_latents(stage("configs/precompute.py:tiny", f"autoencoder_checkpoint={ae_dir}", f"data.root={audio}",
                             MIN_SECONDS, f"data.sample_size={WINDOW_FRAMES * 64}", "batch_size=8",
                             "windows_per_shard=8", "data.read_threads=1", "progress=False"), latents)
    manifest = read_manifest(latents)
    assert manifest["downsampling_ratio"] == 16 * 4 and manifest["latent_shape"] == [16, WINDOW_FRAMES]
    assert manifest["posterior"] is False and manifest["num_items"] == CLIPS * 3
    print("pre", time.perf_counter() - began)

    # 3. SA3 DiT: padded batches of mixed lengths (mask_padding) and the inpainting input.
    dit_dir = tmp_path / "dit"
    dit = stage("configs/diffusion.py:sa3_tiny", f"data.latents={latents}", f"data.latent_length={WINDOW_FRAMES}",
                "objective.mask_padding=True", "training.num_steps=3", "training.checkpoint_every=3",
                "training.log_every=1", "batch_size=8")
    train(dit, dit_dir, default_trainer="diffusion")
    rows = read_metrics(dit_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in rows), rows
    print(rows[-1])
    print("dit", time.perf_counter() - began)

    # 4. A clip shorter than the window, generating only the frames it needs.
    seconds = 0.05  # 2205 samples: 35 frames, in a bucket of 48 of the 64-frame window
    common = dict(steps=2, sampler="rf-euler", sigma_max=1.0, cfg_scale=1.0, batch_size=1, spectrograms=False)
    gen = load_config("configs/generate.py", [f"checkpoint={dit_dir}"])
    gen.unlock()
    gen.update(common, prompt="a calm piano piece", seconds_total=seconds, length_bucket_frames=16)
    record, = generate_to_folder(gen, tmp_path / "generated")
    assert soundfile.info(tmp_path / "generated" / record["file"]).frames == round(seconds * RATE)
    print("gen", time.perf_counter() - began)

    # 5. Inpaint a span of a rendered clip.
    source = sorted((audio / "audio").glob("*.wav"))[0]
    inp = load_config("configs/generate.py", [f"checkpoint={dit_dir}"])
    inp.unlock()
    inp.update(common, prompt="fill", seconds_total=WINDOW_FRAMES * 64 / RATE, inpaint_audio=str(source),
               mask="0.03:0.06")
    record, = generate_to_folder(inp, tmp_path / "inpainted")
    assert record["inpainting"] == "trained_input"
    print("inp", time.perf_counter() - began)

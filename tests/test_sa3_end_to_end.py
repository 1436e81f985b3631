"""Stable Audio 3 end to end on the embedded CC0 set, through the stages' own library entry points (what
launch.prepare_data, launch.train_autoencoder, launch.precompute_latents, launch.train_diffusion and launch.generate
call, with the configs their CLIs load and check): a tiny SAME autoencoder (configs/autoencoder.py:same_tiny) trains,
its latents are precomputed, a tiny SA3 DiT (configs/diffusion.py:sa3_tiny) trains on them with padded batches of mixed
lengths and the inpainting input, then generates a clip shorter than its window and inpaints a span of a rendered
clip. No loop of its own: the shared runner trains both models."""

import numpy as np
import pytest
import soundfile

from musicdiff.config import load_config, validate
from musicdiff.metrics import read_metrics
from tests.autoencoder_fixtures import render_folder

RATE = 44100
RATIO = 16 * 4  # same_tiny: 16-sample patches x stride 4 per latent frame
LATENT_DIM = 16  # same_tiny's latent_dim = sa3_tiny's io_channels (local_cond_dim 17 = latent_dim + 1)
WINDOW = 64  # the DiT's window and the precompute windows: 64 frames x 64 samples = 4096 samples (0.093 s)
CLIPS, CLIP_SECONDS = 6, 0.25  # 11,025 samples: windows of 64, 64 and ceil(2833 / 64) = 45 real frames
MIN_SECONDS = "data.min_seconds=0.1"  # the scan's default (1 s) would skip these short clips
GENERATED_SECONDS = 0.05  # 2205 samples: 35 frames, generated as 48 (buckets of 16) of the 64-frame window
SPAN = (0.03, 0.06)  # inpainted seconds: frames floor(0.03 * 689.06) = 20 .. ceil(0.06 * 689.06) = 42 (exclusive)
SAMPLING = dict(steps=2, sampler="rf-euler", sigma_max=1.0, cfg_scale=1.0, batch_size=1, spectrograms=False)


def stage(spec: str, *overrides: str):
    """A stage's config as launch.common.run loads and checks it (8 test devices: batches of 8)."""
    import jax

    config = load_config(spec, list(overrides))
    validate(config, jax.device_count())
    return config


def generate_config(checkpoint, **settings):
    config = load_config("configs/generate.py", [f"checkpoint={checkpoint}"])
    config.unlock()
    config.update(SAMPLING, **settings)
    return config


@pytest.mark.usefixtures("devices")
def test_same_and_sa3_dit_train_generate_and_inpaint_end_to_end(tmp_path, measurement):
    from data_pipelines.latent_source import latent_training_dataset, read_manifest
    from musicdiff.checkpoints import find_checkpoint
    from musicdiff.inference.batch_generation import generate_to_folder
    from musicdiff.inference.generate import Generator
    from musicdiff.inference.precompute import precompute_latents
    from musicdiff.training.runner import train

    # 0. The embedded synthetic set (launch.prepare_data's writer).
    audio = render_folder(tmp_path / "audio", clips=CLIPS, seconds=CLIP_SECONDS)

    # 1. SAME: two reconstruction (warm-up) steps through the shared runner, as launch.train_autoencoder runs it. At
    # initialisation SAME's decoder ignores its latents (the zero-initialised attention outputs leave the upsampled
    # positions at the learned new token: every frame decodes to the same audio), so the two steps take the full
    # learning rate (no InverseLR warm-up), enough for decoded audio to depend on the latents (step 5).
    ae_dir = tmp_path / "autoencoder"
    train(stage("configs/autoencoder.py:same_tiny", f"data.root={audio}", MIN_SECONDS, "data.heldout_fraction=0.0",
                "batch_size=8", "training.num_steps=2", "training.warmup_steps=2", "training.warmup_mode=full",
                "training.lr_warmup=0.0", "training.generator.learning_rate=1e-2",
                "training.checkpoint_every=2", "training.demo_every=0", "training.log_every=1",
                "training.stft_fft_sizes=(256, 64)", "discriminator.n_ffts=(256,)", "discriminator.filters=4"),
          ae_dir, default_trainer="autoencoder")
    ae_rows = read_metrics(ae_dir / "metrics.jsonl")
    assert [r["step"] for r in ae_rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in ae_rows), ae_rows
    assert find_checkpoint(ae_dir).step == 2

    # 2. Latents of every window (launch.precompute_latents): SAME's deterministic softnorm latents, no posterior.
    latents = tmp_path / "latents"
    precompute_latents(stage("configs/precompute.py:tiny", f"autoencoder_checkpoint={ae_dir}", f"data.root={audio}",
                             MIN_SECONDS, f"data.sample_size={WINDOW * RATIO}", "batch_size=8", "windows_per_shard=8",
                             "data.read_threads=1", "progress=False"), latents)
    manifest = read_manifest(latents)
    assert manifest["downsampling_ratio"] == RATIO and manifest["latent_shape"] == [LATENT_DIM, WINDOW]
    assert manifest["posterior"] is False and manifest["num_items"] == CLIPS * 3
    # The training source pads each clip's last window: batches mix 64- and 45-frame clips.
    batch = next(iter(latent_training_dataset(latents, latent_length=WINDOW, batch_size=8, seed=0, shuffle_seed=0,
                                              process_index=0, process_count=1, num_epochs=1)))
    assert batch["latents"].shape == (8, LATENT_DIM, WINDOW)
    assert set(batch["padding_mask"].sum(axis=-1).astype(int).tolist()) == {45, WINDOW}

    # 3. The SA3 DiT (launch.train_diffusion) on those latents: variable-length loss and attention masking, and the
    # 17-channel inpainting input (sa3_tiny's local_cond_dim = same_tiny's latent_dim + 1, no override needed).
    dit_dir = tmp_path / "dit"
    dit = stage("configs/diffusion.py:sa3_tiny", f"data.latents={latents}", f"data.latent_length={WINDOW}",
                "objective.mask_padding=True", "training.num_steps=3", "training.checkpoint_every=3",
                "training.log_every=1", "batch_size=8")
    assert dit.model.io_channels == LATENT_DIM and dit.model.local_cond_dim == LATENT_DIM + 1
    train(dit, dit_dir, default_trainer="diffusion")
    rows = read_metrics(dit_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows), rows
    assert all(r["update_skipped"] == 0.0 for r in rows)
    assert min(r["inpaint_generated_fraction"] for r in rows) < 1.0  # inpainting masks kept context frames
    measurement("DiT losses", ", ".join(f"{r['loss']:.3f}" for r in rows))
    assert find_checkpoint(dit_dir).step == 3

    # 4. A clip shorter than the window (launch.generate), generating only the frames it needs.
    record, = generate_to_folder(generate_config(dit_dir, prompt="a calm piano piece",
                                                 seconds_total=GENERATED_SECONDS, length_bucket_frames=16),
                                 tmp_path / "generated")
    generated, rate = soundfile.read(tmp_path / "generated" / record["file"], always_2d=True)
    assert rate == RATE and generated.shape == (round(GENERATED_SECONDS * RATE), 2)
    assert np.all(np.isfinite(generated)) and np.abs(generated).max() > 0

    # 5. Inpaint a span of a rendered clip (launch.generate with inpaint_audio + mask): the model's trained input.
    source = sorted((audio / "audio").glob("*.wav"))[0]
    window_seconds = WINDOW * RATIO / RATE
    record, = generate_to_folder(generate_config(dit_dir, prompt="fill", seconds_total=window_seconds,
                                                 inpaint_audio=str(source), mask=f"{SPAN[0]}:{SPAN[1]}"),
                                 tmp_path / "inpainted")
    assert record["inpainting"] == "trained_input"
    inpainted = soundfile.read(tmp_path / "inpainted" / record["file"], always_2d=True, dtype="float32")[0].T
    original = soundfile.read(source, always_2d=True, dtype="float32")[0].T[:, :WINDOW * RATIO]
    # The autoencoder's own reconstruction of the window (the generator's encode and decode).
    generator = Generator.from_checkpoint(str(dit_dir))
    reconstruction = generator.decode(generator.encode_audio(original[None]))[0]
    assert inpainted.shape == original.shape == reconstruction.shape
    # Measured (this test, 2 AE steps at lr 1e-2, 3 DiT steps): |inpainted - reconstruction| is 0 (WAV rounding) on
    # every frame but 18..43, i.e. the span 20..41 and the decoder's reach of 2 frames each side, and 0.06-0.14 per
    # frame inside the span; the reconstruction itself is ~0.4 peak, ~0.5-1.0 off the rendered clip per frame.
    frames = np.arange(WINDOW * RATIO) // RATIO
    span = (frames >= 20) & (frames < 42)
    kept = (frames < 20 - 4) | (frames >= 42 + 4)  # 4 frames of margin for the decoder's reach

    def rms(x, where):
        return float(np.sqrt(np.mean(np.square(x[:, where]))))

    kept_change = float(np.abs(inpainted - reconstruction)[:, kept].max())
    span_change = rms(inpainted - reconstruction, span)
    measurement("kept region max |inpainted - reconstruction|", kept_change)
    measurement("span rms(inpainted - reconstruction)", span_change)
    # The kept latents are pasted back unchanged: their audio is the reconstruction up to 16-bit WAV rounding
    # (3e-5 a step; bound 1e-4), so it is as close to the rendered clip as the autoencoder's own reconstruction.
    assert kept_change <= 1e-4
    assert rms(inpainted - original, kept) <= 1.01 * rms(reconstruction - original, kept)
    # The span is generated: 100x the kept bound (a merge that kept the span, or dropped the mask, fails here or above).
    assert span_change >= 1e-2

"""Inpainting at generation (inference/inpainting.py): the trained input for models with local conditioning, the
RePaint fallback for the others, mask files, and the records."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.inference.batch_generation import generate_to_folder
from musicdiff.inference.generate import Generator, SamplerSettings, mask_from_spans
from musicdiff.inference.inpainting import (REPAINT_FALLBACK, TRAINED_INPUT, TRAINED_MERGE, local_inpaint_input,
                                            mask_from_file)
from tests.model_fixtures import random_autoencoder, random_diffusion

LATENT_LENGTH = 64  # 0.37 s windows of the tiny autoencoder
CHANNELS = 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    autoencoder = random_autoencoder(root / "ae")
    trained = random_diffusion(root / "dit", autoencoder, [f"data.latent_length={LATENT_LENGTH}",
                                                           f"model.local_cond_dim={CHANNELS + 1}"])
    plain = random_diffusion(root / "plain", autoencoder, [f"data.latent_length={LATENT_LENGTH}"])
    return trained, plain


@pytest.fixture(scope="module")
def generator(checkpoints):
    return Generator.from_checkpoint(str(checkpoints[0]))


def test_local_input_closed_form():
    known = jnp.asarray(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    regenerate = jnp.asarray([[[0.0, 1.0, 1.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    local = np.asarray(local_inpaint_input(known, regenerate))
    keep = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(local[:, 0], keep)
    np.testing.assert_array_equal(local[:, 1:], np.asarray(known) * keep[:, None])
    np.testing.assert_array_equal(np.asarray(local_inpaint_input(known, regenerate[:, 0])), local)


def test_mask_file_is_keep_per_latent_frame(tmp_path):
    keep = np.ones(LATENT_LENGTH, np.float32)
    keep[40:] = 0  # continuation from frame 40
    path = tmp_path / "mask.npy"
    np.save(path, keep)
    np.testing.assert_array_equal(mask_from_file(str(path), LATENT_LENGTH), 1.0 - keep)
    np.save(tmp_path / "short.npy", keep[:10])
    with pytest.raises(ConfigError, match=r"config.mask_file=.*short.npy: has shape \(10,\).*\(64,\)"):
        mask_from_file(str(tmp_path / "short.npy"), LATENT_LENGTH)
    np.save(tmp_path / "half.npy", keep * 0.5)
    with pytest.raises(ConfigError, match="0 \\(generate\\) or 1 \\(keep\\)"):
        mask_from_file(str(tmp_path / "half.npy"), LATENT_LENGTH)
    np.save(tmp_path / "all.npy", np.ones(LATENT_LENGTH))
    with pytest.raises(ConfigError, match="keeps every frame"):
        mask_from_file(str(tmp_path / "all.npy"), LATENT_LENGTH)
    with pytest.raises(ConfigError, match="config.mask_file=.*mask.txt"):
        mask_from_file(str(tmp_path / "mask.txt"), LATENT_LENGTH)


def test_trained_input_reaches_the_model_without_a_merge_between_steps(generator, checkpoints):
    assert generator.inpainting_method(SamplerSettings()) == TRAINED_INPUT
    assert generator.inpainting_method(SamplerSettings(inpainting="repaint")) == REPAINT_FALLBACK
    assert Generator.from_checkpoint(str(checkpoints[1])).inpainting_method(SamplerSettings()) == REPAINT_FALLBACK
    frame_rate = generator.sample_rate / generator.ratio
    regenerate = jnp.asarray(mask_from_spans("0.1:0.2", generator.window_seconds, LATENT_LENGTH, frame_rate))
    rng = np.random.default_rng(0)
    known = jnp.asarray(rng.normal(size=(1, CHANNELS, LATENT_LENGTH)), jnp.float32)
    other = jnp.asarray(rng.normal(size=(1, CHANNELS, LATENT_LENGTH)), jnp.float32)
    # CFG 3: the local input goes to both halves of the doubled batch
    settings = SamplerSettings(sampler="dpmpp-2m", steps=3, cfg_scale=3.0, sigma_min=0.05, sigma_max=10.0)

    def run(inpaint):
        return np.asarray(generator.sample_latents(["x"], [0.3], settings, [0], inpaint=inpaint))

    text_only = run(None)
    with_known = run((known, regenerate[None, None]))
    with_other = run((other, regenerate[None, None]))
    keep = np.asarray(regenerate) == 0
    span = ~keep
    # in the regenerated span: the input changes the output, and the known latents are what it carries
    assert np.max(np.abs(with_known[..., span] - text_only[..., span])) > 1e-3
    assert np.max(np.abs(with_known[..., span] - with_other[..., span])) > 1e-3
    # the kept frames are the known latents, pasted back once at the end
    np.testing.assert_array_equal(with_known[..., keep], np.asarray(known)[..., keep])
    # forced RePaint on the same model: the kept frames are the known latents, merged back after the last step
    forced = dataclasses.replace(settings, inpainting="repaint")
    repainted = np.asarray(generator.sample_latents(["x"], [0.3], forced, [0], inpaint=(known, regenerate[None, None])))
    np.testing.assert_allclose(repainted[..., keep], np.asarray(known)[..., keep], atol=1e-5)
    # trained input and merge (SA3's TensorRT port): merged like RePaint, and the input still reaches the model
    both = dataclasses.replace(settings, inpainting="trained_merge")
    assert generator.inpainting_method(both) == TRAINED_MERGE
    merged = np.asarray(generator.sample_latents(["x"], [0.3], both, [0], inpaint=(known, regenerate[None, None])))
    np.testing.assert_allclose(merged[..., keep], np.asarray(known)[..., keep], atol=1e-5)
    assert np.max(np.abs(merged[..., span] - repainted[..., span])) > 1e-3
    with pytest.raises(ConfigError, match="trained_merge"):
        Generator.from_checkpoint(str(checkpoints[1])).inpainting_method(both)
    # projected guidance (APG) runs the doubled batch through its own path: the input reaches it too
    apg = SamplerSettings(sampler="dpmpp-2m", steps=3, cfg_scale=3.0, sigma_min=0.05, sigma_max=10.0, guidance="apg")
    apg_known = np.asarray(generator.sample_latents(["x"], [0.3], apg, [0], inpaint=(known, regenerate[None, None])))
    apg_text = np.asarray(generator.sample_latents(["x"], [0.3], apg, [0]))
    assert np.all(np.isfinite(apg_known)) and np.max(np.abs(apg_known - apg_text)) > 1e-3


def test_records_name_the_method_and_mask_file(checkpoints, tmp_path):
    source = tmp_path / "source.wav"
    t = np.arange(int(0.37 * 44100)) / 44100
    soundfile.write(source, np.stack([np.sin(2 * np.pi * 220 * t)] * 2, 1) * 0.3, 44100)
    keep = np.ones(LATENT_LENGTH, np.float32)
    keep[32:] = 0
    np.save(tmp_path / "continue.npy", keep)

    def config(checkpoint, **overrides):
        c = load_config("configs/generate.py:demo", [f"checkpoint={checkpoint}", "steps=2", "batch_size=1",
                                                     "prompt=continue", "seconds_total=0.3",
                                                     f"inpaint_audio={source}"])
        c.unlock()
        c.update(overrides)
        return c

    records = generate_to_folder(config(checkpoints[0], mask_file=str(tmp_path / "continue.npy")), tmp_path / "a")
    assert records[0]["inpainting"] == TRAINED_INPUT and records[0]["mask_file"].endswith("continue.npy")
    assert "mask" not in records[0] and "trained with the inpainting input" in records[0]["inpainting_note"]
    with pytest.raises(ConfigError, match="not both"):
        generate_to_folder(config(checkpoints[0], mask="0.1:", mask_file=str(tmp_path / "continue.npy")),
                           tmp_path / "b")
    with pytest.raises(ConfigError, match="inpaint_audio"):
        generate_to_folder(config(checkpoints[0], inpaint_audio="", mask="0.1:"), tmp_path / "c")


def test_inpainting_scores_closed_forms():
    from musicdiff.eval.inpainting_eval import clip_scores

    rate = 16000
    t = np.arange(rate) / rate
    clip = (0.3 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32)
    span = (6000, 10000)
    same = clip_scores(clip, clip, clip, rate, span, 4)
    assert same["kept_mel"] == 0.0 and same["autoencoder_mel"] == 0.0 and same["seam_mel"] == 0.0
    jumped = clip.copy()
    jumped[:, span[0]:span[1]] = (0.3 * np.sin(2 * np.pi * 1800 * t[span[0]:span[1]]))  # another pitch in the span
    scores = clip_scores(clip, jumped, clip, rate, span, 4)
    assert scores["seam_mel"] > 1.0  # a pitch jump at both boundaries the original does not have
    assert scores["kept_mel"] == 0.0  # the kept region is the original (frames the span's STFT reaches excluded)


def test_inpainting_evaluation_runs_both_methods(checkpoints, tmp_path):
    from musicdiff.eval.stage import evaluate

    folder = tmp_path / "clips"
    folder.mkdir()
    t = np.arange(int(0.37 * 44100)) / 44100
    lines = []
    for index, freq in enumerate((220.0, 330.0)):
        soundfile.write(folder / f"{index}.wav", np.stack([np.sin(2 * np.pi * freq * t)] * 2, 1) * 0.3, 44100)
        lines.append(f'{{"path": "{index}.wav", "caption": "tone {index}", "license": "CC0-1.0"}}')
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    config = load_config("configs/evaluate.py:inpainting", [f"checkpoint={checkpoints[0]}", f"data.root={folder}",
                                                           "generate.steps=2", "seam_frames=2", "data.min_seconds=0.1",
                                                           "bootstrap.resamples=50"])
    report = evaluate(config, tmp_path / "out")
    assert report["clips"] == 2 and set(report["verdicts"]) == {"seam_mel", "seam_mel_difference"}
    per_clip = [json.loads(line) for line in (tmp_path / "out" / "per_clip.jsonl").read_text().splitlines()]
    paired = np.mean([row["trained_input/seam_mel"] - row["repaint/seam_mel"] for row in per_clip])
    assert report["metrics"]["seam_mel_difference"]["value"] == pytest.approx(paired, abs=1e-12)
    for method in ("trained_input", "repaint"):
        assert (tmp_path / "out" / method / "001.wav").is_file()
        assert np.isfinite(report["metrics"][f"{method}/kept_mel"]["value"])
    plain = load_config("configs/evaluate.py:inpainting", [f"checkpoint={checkpoints[1]}", f"data.root={folder}",
                                                          "data.min_seconds=0.1"])
    with pytest.raises(ConfigError, match="needs a model trained with the inpainting input"):
        evaluate(plain, tmp_path / "plain")

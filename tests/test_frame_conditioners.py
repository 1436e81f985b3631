"""Frame conditioners: the beat grid and the key features against their closed forms, the routing into the DiT's
input channels, and the conventions shared by the training data (a crop's beat_offset, the clip's key) and
generation (the tempo and key a prompt names)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.latent_source import CropAndSample
from musicdiff.config import load_config
from musicdiff.errors import ConfigError
from musicdiff.models.beat_grid import BeatGridConditioner, beat_grid, prompt_bpm
from musicdiff.models.conditioning import MultiConditioner, null_condition
from musicdiff.models.denoiser import ConditioningInputs
from musicdiff.models.dit import DiT, DiTConfig
from musicdiff.models.key_chroma import KeyChromaConditioner, key_features

RATE = 62.5  # latent frames per second of the demo autoencoder (16 kHz / 256)


def test_prompt_bpm_reads_the_tempo_a_caption_names():
    assert prompt_bpm("an upbeat track in A minor at 128 BPM with drums") == 128.0
    assert prompt_bpm("Energetic C major song, 90 beats per minute") == 90.0
    assert prompt_bpm("Amen break 174bpm") == 174.0
    assert prompt_bpm("a calm piano piece in C major") == 0.0


def test_the_grid_is_its_closed_form():
    bpm, offset, harmonics = np.array([120.0, 97.0]), np.array([0.0, 0.31]), (0.25, 1.0, 4.0)
    grid = np.asarray(beat_grid(jnp.asarray(bpm), jnp.asarray(offset), 300, RATE, harmonics))
    assert grid.shape == (2, 7, 300)
    t = np.arange(300) / RATE
    for b in range(2):
        for i, h in enumerate(harmonics):
            phase = 2 * np.pi * h * bpm[b] / 60 * (t - offset[b])
            np.testing.assert_allclose(grid[b, 2 * i], np.cos(phase), atol=2e-4)
            np.testing.assert_allclose(grid[b, 2 * i + 1], np.sin(phase), atol=2e-4)
        np.testing.assert_array_equal(grid[b, -1], 1.0)
    # At 120 BPM the beat channel's cosine is 1 exactly every 0.5 s (every 31.25 frames), and not in between.
    beats = np.flatnonzero(grid[0, 2] > 0.999)
    np.testing.assert_array_equal(beats, [j for j in range(300) if abs((j / RATE * 2 + 0.5) % 1 - 0.5) < 0.006])


def test_an_unknown_tempo_is_the_all_zero_grid():
    conditioner = BeatGridConditioner(16, RATE, dropout=0.0)
    grid, known = conditioner({"bpm": jnp.array([0.0, 100.0]), "beat_offset": jnp.zeros(2)})
    np.testing.assert_array_equal(np.asarray(grid[0]), 0.0)
    assert np.asarray(grid[1, -1]).min() == 1.0 and list(np.asarray(known)) == [False, True]
    with pytest.raises(ConfigError, match="training fills them from the latents"):
        BeatGridConditioner(0, 0.0)({"bpm": jnp.array([100.0])})
    from musicdiff.models.conditioning import build_conditioner

    with pytest.raises(ConfigError, match="key_chroma conditioner config .*harmonics"):
        build_conditioner({"id": "key", "type": "key_chroma", "config": {"frames": 4, "harmonics": [1.0]}}, 8,
                          nnx.Rngs(0))


def test_key_features_are_the_scale_and_the_tonic_triad():
    c_major, a_minor, e_flat_minor, unknown = np.asarray(key_features(jnp.array([0, 9, 3, 4]),
                                                                      jnp.array([0, 1, 1, -1])))
    np.testing.assert_array_equal(np.flatnonzero(c_major[:12]), [0, 2, 4, 5, 7, 9, 11])  # C D E F G A B
    np.testing.assert_array_equal(np.flatnonzero(c_major[12:24]), [0, 4, 7])  # C E G
    # The relative minor has the same notes; its triad (A C E) tells it apart.
    np.testing.assert_array_equal(a_minor[:12], c_major[:12])
    np.testing.assert_array_equal(np.flatnonzero(a_minor[12:24]), [0, 4, 9])
    np.testing.assert_array_equal(np.flatnonzero(e_flat_minor[:12]), [1, 3, 5, 6, 8, 10, 11])  # Eb F Gb Ab Bb B(Cb) Db
    np.testing.assert_array_equal(np.flatnonzero(e_flat_minor[12:24]), [3, 6, 10])  # Eb Gb Bb
    assert c_major[24] == a_minor[24] == 1.0
    np.testing.assert_array_equal(unknown, 0.0)
    features, known = KeyChromaConditioner(5, RATE)({"tonic": jnp.array([9]), "mode": jnp.array([1])})
    assert features.shape == (1, 25, 5) and bool(known[0])
    np.testing.assert_array_equal(np.asarray(features[0, :, 3]), a_minor)


def _conditioner(dropout: float) -> MultiConditioner:
    entries = [dict(id="seconds_total", type="number", config=dict(min_val=0, max_val=10)),
               dict(id="tempo", type="beat_grid", config=dict(frames=8, frame_rate=RATE, harmonics=(1.0,),
                                                              dropout=dropout))]
    return MultiConditioner(dict(configs=entries, cond_dim=4), rngs=nnx.Rngs(0),
                            cross_attention_cond_ids=("seconds_total",), input_concat_cond_ids=("tempo",))


@pytest.mark.usefixtures("unsharded")
def test_routing_concatenates_channels_and_hides_them_with_its_own_draws_and_for_cfg():
    inputs = {"seconds_total": jnp.full(64, 4.0), "tempo": {"bpm": jnp.full(64, 120.0), "beat_offset": jnp.zeros(64)}}
    key = jax.random.key(3)
    kept = _conditioner(0.0).condition(inputs, key=key, cfg_dropout_prob=0.5)
    hidden = _conditioner(0.5).condition(inputs, key=key, cfg_dropout_prob=0.5)
    assert kept.input_concat.shape == (64, 3, 8)
    np.testing.assert_array_equal(np.asarray(kept.input_concat[0]), np.asarray(beat_grid(jnp.array([120.0]),
                                                                                          0.0, 8, RATE, (1.0,))[0]))
    # The cross-attention draws do not move when a hidden input condition joins; the hidden rows are all zero.
    np.testing.assert_array_equal(np.asarray(kept.cross_tokens), np.asarray(hidden.cross_tokens))
    zero = np.asarray(jnp.all(hidden.input_concat == 0, axis=(1, 2)))
    assert 16 < zero.sum() < 48
    np.testing.assert_array_equal(np.asarray(hidden.input_concat)[~zero], np.asarray(kept.input_concat)[~zero])
    # Classifier-free guidance's null condition hides the features, as training does.
    np.testing.assert_array_equal(np.asarray(null_condition(kept).input_concat), 0.0)
    with pytest.raises(ConfigError, match="only frame conditioners"):
        MultiConditioner(dict(configs=[dict(id="n", type="number", config={})], cond_dim=4), rngs=nnx.Rngs(0),
                         cross_attention_cond_ids=("n",), input_concat_cond_ids=("n",))


@pytest.mark.usefixtures("unsharded")
def test_the_dit_appends_the_features_to_its_input_channels():
    sizes = dict(io_channels=4, embed_dim=16, depth=1, num_heads=2, cond_token_dim=0, global_cond_dim=0,
                 rotary_min_dim=4, dtype="float32", patch_size=2)
    model = DiT(DiTConfig(**sizes, input_concat_dim=3), rngs=nnx.Rngs(0))
    assert model.preprocess_conv.kernel.shape == (14, 14) and model.transformer.project_in.kernel.shape == (14, 16)
    assert model.postprocess_conv.kernel.shape == (8, 8) and model.transformer.project_out.kernel.shape == (16, 8)
    x, t = jax.random.normal(jax.random.key(0), (2, 4, 6)), jnp.array([0.3, 0.7])
    features = jax.random.normal(jax.random.key(1), (2, 3, 6))
    with_features = model(x, t, ConditioningInputs(None, None, None, features))
    assert with_features.shape == x.shape
    # No features is the hidden condition: the same as all-zero features, and different from these.
    np.testing.assert_allclose(np.asarray(model(x, t, None)),
                               np.asarray(model(x, t, ConditioningInputs(None, None, None, jnp.zeros_like(features)))))
    # The zero-initialised preprocess conv passes features straight to project_in: perturb it so they matter.
    model.transformer.project_in.kernel[...] = jax.random.normal(jax.random.key(2), (14, 16))
    assert not np.allclose(np.asarray(model(x, t, ConditioningInputs(None, None, None, features))),
                           np.asarray(model(x, t, None)))
    with pytest.raises(ValueError, match="input_concat_dim is 0"):
        DiT(DiTConfig(**sizes), rngs=nnx.Rngs(0))(x, t, ConditioningInputs(None, None, None, features))
    with pytest.raises(ValueError, match="latent frames"):
        model(x, t, ConditioningInputs(None, None, None, features[..., :4]))


def test_a_training_crop_and_a_generation_window_place_beats_alike():
    """The data's beat_offset (first beat − crop start) and generation's (− seconds_start) are one convention: a
    training window 2 s into a clip and the generation window starting at second 2 get the same grid."""
    from musicdiff.inference.generate import conditioning_inputs

    ratio, rate, length = 256, 16000, 125  # 125 frames = 2 s at 62.5 frames/s
    manifest = {"downsampling_ratio": ratio, "sample_rate": rate,
                "text_encoder": {"name": "embedded", "max_length": 4}}
    record = {"latent_mean": np.zeros((2, length), np.float32), "latent_mask": np.ones(length, bool),
              "offset": 2 * rate, "seconds_total": 8.0, "caption": "x", "prompt_input_ids": np.ones(4, np.int32),
              "prompt_attention_mask": np.ones(4, bool), "attributes": json.dumps({"bpm": 90})}
    example = CropAndSample(length, manifest).random_map(record, np.random.default_rng(0))
    assert (example["bpm"], example["beat_offset"], example["seconds_start"]) == (90.0, -2.0, 2.0)
    conditioner = BeatGridConditioner(length, rate / ratio)
    trained = conditioner({"bpm": example["bpm"][None], "beat_offset": example["beat_offset"][None]})[0]
    generated = conditioning_inputs({}, ["a song at 90 BPM"], [2.0], [2.0])["tempo"]
    np.testing.assert_allclose(np.asarray(conditioner(generated)[0]), np.asarray(trained), atol=1e-5)
    assert (example["tonic"], example["mode"]) == (-1, -1)  # the clip states no key
    # 90 BPM: beats every 2/3 s, so at 2 s (a whole beat, 3 beats in) the window starts on a beat.
    assert float(trained[0, 4, 0]) == pytest.approx(1.0, abs=1e-5)
    # A first beat a quarter beat late delays the beat channel by a quarter period: cos(φ − π/2) = sin φ.
    late = CropAndSample(length, manifest).random_map(
        dict(record, attributes=json.dumps({"bpm": 90, "first_beat": 60 / 90 / 4})), np.random.default_rng(0))
    shifted = conditioner({"bpm": late["bpm"][None], "beat_offset": late["beat_offset"][None]})[0]
    np.testing.assert_allclose(np.asarray(shifted[0, 4]), np.asarray(trained[0, 5]), atol=1e-4)


def test_the_demo_preset_routes_tempo_and_key_into_the_dit():
    config = load_config("configs/diffusion.py:demo")
    entry = next(e for e in config.conditioner.conditioning.configs if e["id"] == "tempo")
    assert entry["type"] == "beat_grid" and tuple(config.conditioner.input_concat_cond_ids) == ("tempo", "key")
    assert config.model.input_concat_dim == 2 * len(entry["config"]["harmonics"]) + 1 + 25
    for preset in ("sao", "sao_small", "tiny"):
        other = load_config(f"configs/diffusion.py:{preset}")
        assert "input_concat_dim" not in other.model and "input_concat_cond_ids" not in other.conditioner


@pytest.fixture(scope="module")
def tempo_latents(tmp_path_factory):
    from musicdiff.inference.precompute import precompute_latents
    from tests.precompute_fixtures import precompute_config, save_autoencoder, write_audio_folder

    base = tmp_path_factory.mktemp("tempo_latents")
    root = write_audio_folder(base / "audio")
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    for k, line in enumerate(lines):
        line["attributes"] = dict(line.get("attributes", {}), bpm=80 + 10 * k, tonic_pitch_class=k,
                                  mode=("major", "minor")[k % 2])
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = base / "latents"
    precompute_latents(precompute_config(save_autoencoder(base / "autoencoder"), root), out)
    return out


def test_training_fills_the_window_from_the_latents_and_generation_reads_tempo_and_key(tempo_latents, tmp_path):
    from data_pipelines.latent_source import read_manifest
    from musicdiff.inference.generate import Generator, SamplerSettings
    from musicdiff.parallel.sharding import unsharded
    from musicdiff.training.runner import train

    config = load_config("configs/diffusion.py:tiny", [f"data.latents={tempo_latents}", "training.num_steps=2",
                                                       "training.checkpoint_every=2", "batch_size=8"])
    config.unlock()
    config.conditioner.conditioning.configs.extend([
        dict(id="tempo", type="beat_grid", config=dict(frames=0, frame_rate=0.0, dropout=0.1)),
        dict(id="key", type="key_chroma", config=dict(frames=0))])
    config.conditioner.input_concat_cond_ids = ("tempo", "key")
    config.model.input_concat_dim = 11
    with pytest.raises(ConfigError, match="input_concat_dim=11: .* give 36 channels"):
        train(config, tmp_path / "wrong", default_trainer="diffusion")
    config.model.input_concat_dim = 11 + 25
    train(config, tmp_path / "run", default_trainer="diffusion")

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    tempo, key = (entry["config"] for entry in saved["conditioner"]["conditioning"]["configs"][-2:])
    assert tempo["frames"] == key["frames"] == saved["data"]["latent_length"] == 32
    assert tempo["frame_rate"] == read_manifest(tempo_latents)["latent_rate"] == 44100 / 256

    generator = Generator.from_checkpoint(str(tmp_path / "run"))
    conditioner = nnx.merge(generator.graphdefs["conditioner"], generator.params["conditioner"])
    with unsharded():
        cond = conditioner.condition(generator.conditioning_inputs(["warm piano in D minor at 120 BPM",
                                                                    "warm piano"], [0.0, 0.0], [0.1, 0.1]))
    grid = beat_grid(jnp.array([120.0, 0.0]), jnp.zeros(2), 32, 44100 / 256)
    key = jnp.broadcast_to(key_features(jnp.array([2, -1]), jnp.array([1, -1]))[:, :, None], (2, 25, 32))
    np.testing.assert_allclose(np.asarray(cond.input_concat), np.asarray(jnp.concatenate([grid, key], axis=1)),
                               atol=1e-6)
    settings = SamplerSettings(sampler="dpmpp-2m", steps=2, cfg_scale=3.0, sigma_min=0.03, sigma_max=80.0)
    latents = generator.sample_latents(["warm piano at 120 BPM", "warm piano"], [0.1, 0.1], settings, [0, 1])
    assert latents.shape == (2, 64, 32) and bool(jnp.isfinite(latents).all())


def test_a_clips_key_and_a_prompts_key_give_the_same_features():
    from musicdiff.inference.generate import conditioning_inputs

    manifest = {"downsampling_ratio": 256, "sample_rate": 16000, "text_encoder": {"name": "embedded", "max_length": 4}}
    record = {"latent_mean": np.zeros((2, 8), np.float32), "latent_mask": np.ones(8, bool), "offset": 0,
              "seconds_total": 1.0, "caption": "x", "prompt_input_ids": np.ones(4, np.int32),
              "prompt_attention_mask": np.ones(4, bool),
              "attributes": json.dumps({"key": "Eb", "tonic_pitch_class": 3, "mode": "minor"})}
    example = CropAndSample(8, manifest).random_map(record, np.random.default_rng(0))
    assert (example["tonic"], example["mode"]) == (3, 1)
    prompts = ["a sad song in E-flat minor", "a song in Eb minor at 80 BPM", "a song with no key"]
    key = conditioning_inputs({}, prompts, [0.0] * 3, [1.0] * 3)["key"]
    np.testing.assert_array_equal(key["tonic"], [3, 3, -1])
    np.testing.assert_array_equal(key["mode"], [1, 1, -1])
    conditioner = KeyChromaConditioner(8, RATE)
    trained = conditioner({"tonic": example["tonic"][None], "mode": example["mode"][None]})[0]
    np.testing.assert_array_equal(np.asarray(conditioner(key)[0][:2]), np.asarray(jnp.concatenate([trained] * 2)))
    np.testing.assert_array_equal(np.asarray(conditioner(key)[0][2]), 0.0)


@pytest.mark.usefixtures("unsharded")
def test_guidance_with_the_implicit_null_context_hides_the_frame_features_as_the_explicit_null():
    from musicdiff.diffusion.parameterization import cfg_denoiser
    from musicdiff.inference.generate import guided_model

    sizes = dict(io_channels=4, embed_dim=16, depth=1, num_heads=2, cond_token_dim=8, global_cond_dim=6,
                 rotary_min_dim=4, dtype="float32", patch_size=2)
    model = DiT(DiTConfig(**sizes, input_concat_dim=3), rngs=nnx.Rngs(0))
    model.transformer.project_in.kernel[...] = jax.random.normal(jax.random.key(2), (14, 16))  # features matter
    keys = jax.random.split(jax.random.key(1), 5)
    cond = ConditioningInputs(jax.random.normal(keys[0], (2, 5, 8)), jnp.ones((2, 5), bool),
                              jax.random.normal(keys[1], (2, 6)), jax.random.normal(keys[2], (2, 3, 6)))
    x, t = jax.random.normal(keys[3], (2, 4, 6)), jnp.array([0.4, 0.9])
    implicit = guided_model(model, cond, 4.0)(x, t)
    explicit = cfg_denoiser(model, cond, null_condition(cond), 4.0)(x, t)
    np.testing.assert_allclose(np.asarray(implicit), np.asarray(explicit), rtol=1e-5, atol=1e-5)
    kept = cfg_denoiser(model, cond, null_condition(cond)._replace(input_concat=cond.input_concat), 4.0)(x, t)
    assert not np.allclose(np.asarray(kept), np.asarray(explicit), atol=1e-4)

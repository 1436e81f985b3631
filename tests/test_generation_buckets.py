"""Variable-length generation (spec §4.6): with length buckets a batch generates only the frames its longest clip
needs, each clip's padding masked and zeroed; the length-aware time shift through the generator; the default keeps
generating the whole window."""

import json
import math

import numpy as np
import pytest
import soundfile

from musicdiff.diffusion.time_shift import TimeShift
from musicdiff.errors import ConfigError
from musicdiff.inference.batch_generation import generate_to_folder
from musicdiff.inference.generate import Generator, SamplerSettings
from tests.model_fixtures import random_autoencoder, random_diffusion
from tests.test_generation import gen_config

WINDOW = 64  # latent frames of the tiny model's window: 64 x 256 samples at 44.1 kHz = 0.37 s
FRAME_RATE = 44100 / 256


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    autoencoder = random_autoencoder(root / "ae")
    diffusion = random_diffusion(root / "dit", autoencoder,
                                 [f"data.latent_length={WINDOW}", "objective.name=rectified_flow"])
    return diffusion, autoencoder


@pytest.fixture(scope="module")
def generator(checkpoints):
    return Generator.from_checkpoint(str(checkpoints[0]))


def bucketed(**overrides):
    return SamplerSettings(**{**dict(sampler="rf-euler", steps=2, cfg_scale=1.0, sigma_max=1.0,
                                     length_bucket_frames=16), **overrides})


def test_generated_length_is_the_longest_need_rounded_up_to_the_bucket(generator):
    needs = [math.ceil(s * FRAME_RATE) for s in (0.05, 0.1, 0.37)]
    assert needs == [9, 18, 64]
    assert [generator.frames_needed(s) for s in (0.05, 0.1, 0.37)] == needs
    settings = bucketed()
    assert generator.generated_length(np.asarray([9, 18]), settings) == 32
    assert generator.generated_length(np.asarray([9]), settings) == 16
    assert generator.generated_length(np.asarray([64]), bucketed(length_bucket_frames=48)) == WINDOW  # capped
    assert generator.generated_length(np.asarray([9]), bucketed(length_bucket_frames=0)) == WINDOW  # the default


def test_short_requests_generate_short_latents_with_zero_padding(generator):
    latents = np.asarray(generator.sample_latents(["a calm piano piece", "warm pads"], [0.05, 0.1], bucketed(),
                                                  [7, 3]))
    assert latents.shape == (2, 64, 32)
    assert np.all(latents[0, :, 9:] == 0) and np.all(latents[1, :, 18:] == 0)
    assert np.abs(latents[0, :, :9]).min() > 0 and np.abs(latents[1, :, :18]).min() > 0
    # The same bucket with another partner clip: clip 0 is unchanged (its mask, noise and conditioning are its own).
    partner = np.asarray(generator.sample_latents(["a calm piano piece", "organ"], [0.05, 0.15], bucketed(), [7, 4]))
    np.testing.assert_allclose(partner[0], latents[0], atol=1e-6)


def test_default_generates_the_whole_window(generator):
    settings = bucketed(length_bucket_frames=0)
    latents = np.asarray(generator.sample_latents(["a calm piano piece"], [0.05], settings, [7]))
    assert latents.shape == (1, 64, WINDOW) and np.abs(latents[0, :, 9:]).min() > 0


def test_time_shift_changes_the_grid_through_the_generator(generator):
    plain = generator.sample_latents(["a calm piano piece"], [0.1], bucketed(), [7])
    shifted = generator.sample_latents(["a calm piano piece"], [0.1], bucketed(time_shift=TimeShift("full")), [7])
    assert plain.shape == shifted.shape and float(np.max(np.abs(np.asarray(plain) - np.asarray(shifted)))) > 1e-3


def test_bucketed_cli_writes_the_requested_lengths(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    wanted = [0.05, 0.2]
    prompts.write_text("".join(json.dumps({"prompt": f"clip {i}", "seconds_total": s}) + "\n"
                               for i, s in enumerate(wanted)))
    config = gen_config(checkpoints[0], prompts_file=str(prompts), sampler="pingpong", sigma_max=1.0, cfg_scale=1.0,
                        steps=2, batch_size=2, spectrograms=False, length_bucket_frames=16)
    config.time_shift.name = "logsnr"
    records = generate_to_folder(config, tmp_path / "out")
    for record, seconds in zip(records, wanted):
        assert soundfile.info(tmp_path / "out" / record["file"]).frames == round(seconds * 44100)


def test_config_errors():
    with pytest.raises(ConfigError, match="config.length_bucket_frames"):
        bucketed(length_bucket_frames=-1)
    with pytest.raises(ConfigError, match="config.time_shift.name"):
        SamplerSettings(sampler="dpmpp-3m-sde", time_shift=TimeShift("full"))

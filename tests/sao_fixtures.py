"""A reduced Stable Audio Open 1.0 model_config.json shared by the converter tests: SAO 1.0's exact layer structure
and routing (tests/fixtures/stable_audio_open_1_0_model_config.json) at small widths and depth."""

from __future__ import annotations

import json
from pathlib import Path

MAX_LENGTH = 8  # t5 tokens of the prompt conditioner
FRAMES = 4  # latent frames: 4 x 2048 audio samples


def reduced_sao_config() -> dict:
    """SAO 1.0's model_config.json (tests/fixtures) with reduced widths and depth, same structure and routing."""
    config = json.loads((Path(__file__).parent / "fixtures" / "stable_audio_open_1_0_model_config.json").read_text())
    config["sample_size"] = 2048 * FRAMES
    ae = config["model"]["pretransform"]["config"]
    ae["encoder"]["config"].update(channels=4, latent_dim=16)
    ae["decoder"]["config"].update(channels=4, latent_dim=8)
    ae["latent_dim"] = 8
    conditioning = config["model"]["conditioning"]
    conditioning["cond_dim"] = 128  # t5-base's 768 is then projected (T5Conditioner.proj_out)
    conditioning["configs"][0]["config"]["max_length"] = MAX_LENGTH
    config["model"]["diffusion"]["config"].update(io_channels=8, embed_dim=256, depth=2, num_heads=4,
                                                  cond_token_dim=128, global_cond_dim=256)
    config["model"]["io_channels"] = 8
    return config

"""The embedded evaluator (model "audio_evaluator") and its training on the synthetic set.

    python -m launch.prepare_data --config=configs/synthetic_data.py --workdir=ROOT --config.num_clips=400 \
        --config.seconds=6.0
    python -m launch.train_evaluator --config=configs/evaluator.py --config.data.root=ROOT --workdir=DIR

Presets: "default" (the command above; about 1-2 minutes on 2 CPU cores) and "tiny" (a few steps, for tests).

- evaluator: the model (musicdiff.models.audio_evaluator). `instruments` and `tempo_edges` are the label
  vocabulary: instrument names of the synthetic set, and BPM bucket boundaries (bucket i holds
  tempo_edges[i-1] <= bpm < tempo_edges[i]). They are saved with the checkpoint, so evaluation decodes labels the
  same way. `window_seconds` / `hop_seconds`: how evaluation cuts clips into the windows it embeds.
- data: the audio folder (manifest attributes bpm, tonic_pitch_class, mode, instruments) read at 16 kHz mono,
  peak-normalised, random `sample_size` crops. Every `holdout_every`-th clip (by manifest order) is held out of
  training and scored at the end (DIR/heldout_accuracy.json).
- training: AdamW at a constant rate; checkpoints under DIR/checkpoints/<step> (section "evaluator").
"""

import ml_collections

from data_pipelines.audio_folder import audio_folder_data
from data_pipelines.synthetic.render import ALL_INSTRUMENTS
from musicdiff.config import choose_preset, stage_config

PRESETS = {
    "default": dict(num_steps=250, batch_size=32, channels=(12, 24, 24), log_every=20, checkpoint_every=250),
    "tiny": dict(num_steps=4, batch_size=8, channels=(4, 8), log_every=2, checkpoint_every=2),
}


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    preset = choose_preset(arg, PRESETS)
    c = stage_config(preset["batch_size"])

    sample_rate = 16000
    c.evaluator = ml_collections.ConfigDict(dict(
        name="audio_evaluator",
        sample_rate=sample_rate,
        n_fft=2048,
        hop=1024,
        min_midi=24,  # C1; 8 octaves of semitone bands up to B8 (7.9 kHz, just under Nyquist)
        octaves=8,
        onset_fft=512,
        onset_hop=160,  # 100 onset frames per second
        max_lag_seconds=1.5,  # periods down to 40 BPM
        channels=preset["channels"],
        tempo_features=32,
        embed_dim=64,
        instruments=ALL_INSTRUMENTS,
        tempo_edges=(85, 100, 115, 130, 145),
        window_seconds=3.0,
        hop_seconds=1.5,
    ))

    c.data = audio_folder_data(
        sample_rate=sample_rate,
        sample_size=3 * sample_rate,
        channels=1,
        normalize="peak",
        shuffle_seed=0,
        batch_size=preset["batch_size"],
        holdout_every=8,
    )

    c.training = ml_collections.ConfigDict(dict(
        num_steps=preset["num_steps"],
        optimizer="adamw",
        learning_rate=3e-3,
        b1=0.9,
        b2=0.99,
        weight_decay=1e-4,
        lr_schedule="constant",
        grad_clip_norm=1.0,
        log_every=preset["log_every"],
        checkpoint_every=preset["checkpoint_every"],
        keep_checkpoints=2,
    ))
    return c

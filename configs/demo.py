"""The `make demo` pipeline: every stage on the embedded CC0 set, sized for ~15 minutes on 2 CPU cores.

    python -m launch.demo --workdir=demo_out [--config.fast=True]

Each entry of `stages` is (name, config file[:preset], overrides) and runs exactly as its CLI would:
`python -m launch.<cli> --config=<file> --config.<override> ... --workdir=<demo_out>/<name>`; the demo prints those
commands, so every step can be rerun by hand. `{root}` and the other `{...}` fields are filled in with the demo's own
folders. `fast=True` shrinks every stage (a smoke run of the wiring, not a useful model).
"""

import ml_collections

from musicdiff.config import choose_preset

NUM_CLIPS, SECONDS = 160, 6.0
HELDOUT_CLIPS = 16  # rendered from another seed: new captions for prompts, the real (ceiling) row and reconstructions
AUTOENCODER_STEPS = 500

STAGES = (
    ("data", "prepare_data", "configs/synthetic_data.py",
     (f"num_clips={NUM_CLIPS}", f"seconds={SECONDS}")),
    ("heldout", "prepare_data", "configs/synthetic_data.py",
     (f"num_clips={HELDOUT_CLIPS}", f"seconds={SECONDS}", "seed=1")),
    ("inspect", "inspect_data", "configs/audio_folder.py", ("root={data}",)),
    # The tiny VAE's reconstruction phase only (the adversarial terms start at warmup_steps): on 2 CPU cores a few
    # hundred steps of short crops at a high learning rate, with a step-0 checkpoint as the evaluation baseline.
    ("autoencoder", "train_autoencoder", "configs/autoencoder.py:tiny",
     ("data.root={data}", f"training.num_steps={AUTOENCODER_STEPS}", f"training.warmup_steps={AUTOENCODER_STEPS}",
      "training.warmup_mode=full", "batch_size=4", "data.sample_size=8192", "training.generator.learning_rate=1e-3",
      "training.lr_warmup=0.95", "training.save_initial_checkpoint=True",
      f"training.checkpoint_every={AUTOENCODER_STEPS}", f"training.demo_every={AUTOENCODER_STEPS}")),
    # Reconstructions of the held-out set (never seen in training): scored, and kept as the "autoencoded" row.
    ("autoencoder_eval_step0", "evaluate", "configs/evaluate.py:autoencoder",
     ("checkpoint={autoencoder}", "step=0", "data.root={heldout}", "data.split=all", "data.max_seconds=3.0")),
    ("autoencoder_eval", "evaluate", "configs/evaluate.py:autoencoder",
     ("checkpoint={autoencoder}", "data.root={heldout}", "data.split=all", "data.max_seconds=3.0",
      "write_audio=True")),
    ("latents", "precompute_latents", "configs/precompute.py:tiny",
     ("autoencoder_checkpoint={autoencoder}", "data.root={data}")),
    ("diffusion", "train_diffusion", "configs/diffusion.py:tiny",
     ("data.latents={latents}", "data.latent_length=256", "training.num_steps=1500", "training.learning_rate=2e-3",
      "training.checkpoint_every=1500", "training.save_initial_checkpoint=True", "training.keep_checkpoints=10",
      "training.log_every=25")),
    ("evaluator", "train_evaluator", "configs/evaluator.py", ("data.root={data}",)),
    ("evaluation", "evaluate", "configs/evaluate.py:embedded",
     ("checkpoints={diffusion}", "reference.audio_dir={data}", "backbones.embedded.checkpoint={evaluator}",
      "prompts_dir={heldout}", f"num_prompts={HELDOUT_CLIPS}", "real_row=True",
      "reference_rows=autoencoded={autoencoder_eval}/reconstructions", "generate.seconds_total=1.4",
      "generate.steps=50")),
)

FAST = {
    "data": ("num_clips=24", "seconds=4.0"),
    "heldout": ("num_clips=4", "seconds=4.0"),
    "autoencoder": ("training.num_steps=20", "training.warmup_steps=20", "training.checkpoint_every=20",
                    "training.demo_every=20"),
    "diffusion": ("training.num_steps=20", "training.checkpoint_every=20", "training.log_every=5"),
    "evaluator": ("training.num_steps=10",),
    "evaluation": ("num_prompts=4", "generate.steps=4", "bootstrap.resamples=200", "bootstrap.fd_resamples=200"),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    choose_preset(arg, {"": None})
    return ml_collections.ConfigDict(dict(
        fast=False,
        preview_clips=4,  # captions and spectrograms of this many rendered clips
        stages=STAGES,
        fast_overrides=FAST,
    ))

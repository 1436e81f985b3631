"""The `make demo` pipeline: every stage on the embedded CC0 set, sized for ~15 minutes on 2 CPU cores.

    python -m launch.demo --workdir=demo_out [--config.fast=True]
    python -m launch.demo --config=configs/demo.py:lora --workdir=demo_out   (after the demo: the LoRA story)

Each entry of `stages` is (name, config file[:preset], overrides) and runs exactly as its CLI would:
`python -m launch.<cli> --config=<file> --config.<override> ... --workdir=<demo_out>/<name>`; the demo prints those
commands, so every step can be rerun by hand. `{root}` and the other `{...}` fields are filled in with the demo's own
folders. `fast=True` shrinks every stage (a smoke run of the wiring, not a useful model).
"""

import ml_collections

from data_pipelines.synthetic.render import ALL_INSTRUMENTS
from musicdiff.config import choose_preset

# The demo's own sizes (the `:sao` presets are untouched): 16 kHz mono, clips exactly one DiT window long (65,536
# samples = 4.1 s = 256 latent frames of the 256x autoencoder), tempos on a 10 BPM grid so 800 clips hold every
# tempo ~80 times and every key ~33 times (../shared/reviews/demo-learnability-2026-12-06.md).
NUM_CLIPS, SAMPLE_RATE, SECONDS = 800, 16000, 4.096
HELDOUT_CLIPS = 32  # rendered from another seed: new captions for prompts, the real (ceiling) row and reconstructions
RENDER = (f"num_clips={NUM_CLIPS}", f"seconds={SECONDS}", f"sample_rate={SAMPLE_RATE}", "bpm_step=10")
# Sampling for the rectified-flow DiT of configs/diffusion.py:demo. CFG 3, not 5: on the long preset's DiT (32 held-out
# prompts, same seeds) CFG 9 / 5 / 3 / 2 / 1.5 gave key 0.50 / 0.63 / 0.84 / 0.84 / 0.84 at tempo 0.88-0.94 (seeds
# +100: CFG 5 0.59, CFG 2 0.84). Strong guidance smears pitch around the tonic, which the key profiles read as minor:
# at CFG 5, 7 of 16 major prompts came out as their parallel minor. Embedded FD fell too (38.7 -> 34.7). The default's
# 1200-step DiT on this autoencoder: key 0.25 at CFG 5 (below its 0.3 bar), 0.41 at CFG 3.
# `make lora-demo`: a DiT that never heard drums (trained like the demo's on 800 clips rendered without them), then a
# LoRA on the demo's clips with drums. Drums because they are what an estimator can hear reliably in generated audio
# (prompt_following.drums_share: every clip with drums and none without, real and autoencoded); the embedded
# evaluator's instrument head could not tell instruments apart in generations (docs/fine_tuning.md).
HELD_OUT_INSTRUMENT = "drums"
WITHOUT_HELD_OUT = "instruments=" + repr(tuple(i for i in ALL_INSTRUMENTS if i != HELD_OUT_INSTRUMENT))
LORA_PROMPTS, LORA_BASE_STEPS, LORA_STEPS = 48, 800, 300
GENERATE = ("generate.sampler=rf-euler", "generate.steps=30", "generate.cfg_scale=3.0", "generate.sigma_min=0.0",
            "generate.sigma_max=1.0")
# Training steps per preset: "" is `make demo` (~16 min on 2 quiet CPU cores, venv installed: AE 0.27 s and DiT
# 0.31 s a step, stage startup included); "long" ~1 h there. The DiT learns tempo by step 800 (frame
# conditioners); 1200 gives the key more. The autoencoder's 1400 steps are what its mel distance needs
# (configs/autoencoder.py:demo).
# "lora" is `make lora-demo` (lora_stages below).
PRESETS = {"": dict(autoencoder=1400, diffusion=1200), "long": dict(autoencoder=4000, diffusion=5000),
           "lora": dict(diffusion=LORA_BASE_STEPS, lora=LORA_STEPS)}


def stages(autoencoder_steps: int, diffusion_steps: int) -> tuple:
    return (
        ("data", "prepare_data", "configs/synthetic_data.py", RENDER),
        ("heldout", "prepare_data", "configs/synthetic_data.py", RENDER[1:] + (f"num_clips={HELDOUT_CLIPS}", "seed=1")),
        ("inspect", "inspect_data", "configs/audio_folder.py", ("root={data}",)),
        # Reconstruction phase only (configs/autoencoder.py:demo), with a step-0 checkpoint as the evaluation baseline.
        ("autoencoder", "train_autoencoder", "configs/autoencoder.py:demo",
         ("data.root={data}", f"training.num_steps={autoencoder_steps}", f"training.warmup_steps={autoencoder_steps}",
          "training.save_initial_checkpoint=True", f"training.checkpoint_every={autoencoder_steps}",
          f"training.demo_every={autoencoder_steps}")),
        # Reconstructions of the held-out set (never seen in training): scored, and kept as the "autoencoded" row.
        ("autoencoder_eval_step0", "evaluate", "configs/evaluate.py:autoencoder",
         ("checkpoint={autoencoder}", "step=0", "data.root={heldout}", "data.split=all")),
        ("autoencoder_eval", "evaluate", "configs/evaluate.py:autoencoder",
         ("checkpoint={autoencoder}", "data.root={heldout}", "data.split=all", "write_audio=True")),
        ("latents", "precompute_latents", "configs/precompute.py:demo",
         ("autoencoder_checkpoint={autoencoder}", "data.root={data}")),
        ("diffusion", "train_diffusion", "configs/diffusion.py:demo",
         ("data.latents={latents}", f"training.num_steps={diffusion_steps}", f"training.checkpoint_every={diffusion_steps}",
          "training.save_initial_checkpoint=True", "training.keep_checkpoints=10")),
        ("evaluator", "train_evaluator", "configs/evaluator.py", ("data.root={data}",)),
        ("evaluation", "evaluate", "configs/evaluate.py:embedded",
         evaluation("{diffusion}", "{heldout}", HELDOUT_CLIPS,
                    "reference_rows=autoencoded={autoencoder_eval}/reconstructions")),
    )


def evaluation(checkpoints: str, prompts_dir: str, num_prompts: int, *extra: str) -> tuple[str, ...]:
    """The embedded evaluation of a diffusion run's checkpoints on the prompts of `prompts_dir`, beside its real clips
    (the ceiling), against the demo's rendered clips and with the demo's evaluator and sampling."""
    return (f"checkpoints={checkpoints}", "reference.audio_dir={data}", "backbones.embedded.checkpoint={evaluator}",
            f"prompts_dir={prompts_dir}", f"num_prompts={num_prompts}", "real_row=True", *extra,
            f"generate.seconds_total={SECONDS}", *GENERATE)


def lora_stages(base_steps: int, lora_steps: int) -> tuple:
    """After `make demo`, in its folder (its autoencoder, evaluator and rendered clips are reused)."""
    return (
        ("data_without_drums", "prepare_data", "configs/synthetic_data.py", RENDER + (WITHOUT_HELD_OUT,)),
        ("latents_without_drums", "precompute_latents", "configs/precompute.py:demo",
         ("autoencoder_checkpoint={autoencoder}", "data.root={data_without_drums}")),
        ("diffusion_without_drums", "train_diffusion", "configs/diffusion.py:demo",
         ("data.latents={latents_without_drums}", f"training.num_steps={base_steps}",
          f"training.checkpoint_every={base_steps}")),
        # Rank 16 over the DiT and its prompt encoder (the word "drums" is new to the encoder: its tokenizer was built
        # from captions without it), 10x SA3's learning rate for a run this short.
        ("lora", "train_lora", "configs/lora.py",
         ("init_from={diffusion_without_drums}", "data.audio={data}", "data.caption_include=('drum',)",
          "lora.include=('model/*','conditioner/*')", "batch_size=16", "training.learning_rate=1e-3",
          f"training.num_steps={lora_steps}", f"training.checkpoint_every={lora_steps}",
          "training.save_initial_checkpoint=True", "training.keep_checkpoints=10")),
        # Prompts from another seed with every instrument (most name drums); step 0 of the adapter run is the DiT
        # without drums itself (a fresh adapter changes nothing).
        ("lora_prompts", "prepare_data", "configs/synthetic_data.py",
         RENDER[1:] + (f"num_clips={LORA_PROMPTS}", "seed=2")),
        ("lora_evaluation", "evaluate", "configs/evaluate.py:embedded",
         evaluation("{lora}", "{lora_prompts}", LORA_PROMPTS)),
    )


FAST = {
    "data": ("num_clips=24",),
    "heldout": ("num_clips=4",),
    "autoencoder": ("training.num_steps=20", "training.warmup_steps=20", "training.checkpoint_every=20",
                    "training.demo_every=20"),
    "diffusion": ("training.num_steps=20", "training.checkpoint_every=20", "training.log_every=5", "batch_size=8"),
    "evaluator": ("training.num_steps=10",),
    "evaluation": ("num_prompts=4", "generate.steps=4", "bootstrap.resamples=200", "bootstrap.fd_resamples=200"),
    "lora": ("training.num_steps=10", "training.checkpoint_every=10", "batch_size=2"),
    "lora_prompts": ("num_clips=4",),
}
# The LoRA story's stages that mirror the demo's shrink as those do.
FAST.update(data_without_drums=FAST["data"], diffusion_without_drums=FAST["diffusion"],
            lora_evaluation=FAST["evaluation"])


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    steps = choose_preset(arg, PRESETS)
    lora = "lora" in steps
    return ml_collections.ConfigDict(dict(
        fast=False,
        preview_clips=4,  # captions and spectrograms of this many rendered clips
        stages=lora_stages(steps["diffusion"], steps["lora"]) if lora else stages(steps["autoencoder"],
                                                                                   steps["diffusion"]),
        summary="lora" if lora else "demo",  # which summary the run ends with (musicdiff/pipeline.py)
        requires=("data", "autoencoder", "evaluator") if lora else (),  # earlier stages' folders this run reads
        held_out_instrument=HELD_OUT_INSTRUMENT,
        fast_overrides=FAST,
    ))

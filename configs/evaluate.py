"""Offline evaluation: `python -m launch.evaluate --config=configs/evaluate.py:PRESET --workdir=OUT`.

The stage is chosen by `kind` (one preset per kind):
- generation: generated audio against a reference set with the Stable Audio protocol's backbones: FD_openl3,
  KL_passt, CLAP score (LAION-CLAP), plus prompt following and inference time. Each backbone needs local weight
  files (docs/evaluation.md says which, and where to put them):
      --config.generated_dir=GEN --config.reference.audio_dir=REF (or --config.reference.stats=A.npz,B.npz)
      --config.backbones.openl3.weights=... --config.backbones.passt.weights=... --config.backbones.clap.weights=...
- embedded: the same stage with the embedded evaluator (no download) for FD and KL, plus its attribute accuracy:
      --config.generated_dir=GEN --config.reference.audio_dir=REF --config.backbones.embedded.checkpoint=EVAL_DIR
Series: --config.checkpoints=RUN generates from every saved step of a diffusion run (settings in `generate`, a
configs/generate.py section; prompts from `prompts_file` or the first `num_prompts` reference captions) and
evaluates each; --config.series_dir=DIR evaluates existing sub-folders <step>/ or step_<step>/ of generations.
Both write OUT/step_<step>/report.*, OUT/series.json and the metric-vs-step plot OUT/series.png.

Keys (generation and embedded):
- generated_dir: the folder launch.generate wrote (audio + generations.jsonl); step: the TensorBoard step
  (-1: the generations' `checkpoint_step`, else 0).
- reference: audio_dir (an audio folder with manifest.jsonl, or plain audio files with pair_by="stem"),
  stats (comma-separated .npz statistics files; each serves the backbone whose id it records), cache_dir (where
  computed reference statistics are cached, keyed by backbone id and file-list hash; "" = OUT/reference_stats),
  pair_by ("prompt": a generation pairs with the reference clip whose caption is its prompt; "stem": file names),
  max_clips (0 = all).
- fd_backbone, kl_backbone, clap_backbone: the backbone of each metric ("" turns the metric off).
- prompt_following: tempo/key estimates against prompts that state them (the embedded set's captions do).
- backbones.<name>: per-backbone settings; `python` runs that backbone in another interpreter (an environment
  where its package is installed; OpenL3's TensorFlow pins do not install beside JAX).
"""

from pathlib import Path

import ml_collections

from musicdiff.config import load_config, to_dict

KINDS = ("generation", "embedded")
GENERATE_PRESET = {"generation": "", "embedded": "demo"}  # configs/generate.py presets for checkpoint series


def _generation_config(kind: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = kind
    c.generated_dir = ""
    c.series_dir = ""
    c.step = -1
    c.checkpoints = ""
    c.prompts_file = ""
    c.num_prompts = 16
    generate_file = Path(__file__).resolve().parent / "generate.py"
    c.generate = ml_collections.ConfigDict(to_dict(load_config(f"{generate_file}:{GENERATE_PRESET[kind]}")))
    c.reference = ml_collections.ConfigDict(dict(audio_dir="", stats="", cache_dir="", pair_by="prompt",
                                                 max_clips=0))
    if kind == "generation":
        c.fd_backbone, c.kl_backbone, c.clap_backbone = "openl3", "passt", "clap"
    else:
        c.fd_backbone, c.kl_backbone, c.clap_backbone = "embedded", "embedded", ""
    c.prompt_following = True
    c.backbones = ml_collections.ConfigDict(dict(
        embedded=dict(checkpoint=""),
        # stable-audio-metrics: 44.1 kHz bandwidth, L/R embedded separately (1024-d), 1-s windows every 0.5 s
        openl3=dict(weights="", python="", content_type="music", sample_rate=44100, channels=2, hop_seconds=0.5),
        passt=dict(weights="", python="", device="cpu"),
        clap=dict(weights="", roberta_dir="", python="", device="cpu", seed=0),
    ))
    return c


def get_config(arg: str = "embedded") -> ml_collections.ConfigDict:
    if arg not in KINDS:
        raise ValueError(f"unknown preset '{arg}'; choose one of {', '.join(KINDS)}")
    return _generation_config(arg)

"""Offline evaluation: `python -m launch.evaluate --config=configs/evaluate.py:PRESET --workdir=OUT`.

The stage is chosen by `kind` (one preset per kind):
- generation: generated audio against a reference set with the Stable Audio protocol's backbones: FD_openl3,
  KL_passt, CLAP score (LAION-CLAP), plus prompt following and inference time. Each backbone needs local weight
  files (docs/evaluation.md says which, and where to put them):
      --config.generated_dir=GEN --config.reference.audio_dir=REF (or --config.reference.stats=A.npz,B.npz)
      --config.backbones.openl3.weights=... --config.backbones.passt.weights=... --config.backbones.clap.weights=...
- embedded: the same stage with the embedded evaluator (no download) for FD and KL, plus its attribute accuracy:
      --config.generated_dir=GEN --config.reference.audio_dir=REF --config.backbones.embedded.checkpoint=EVAL_DIR
- autoencoder: reconstruction scores of an autoencoder checkpoint on the held-out clips of an audio folder
  (musicdiff.eval.autoencoder_eval): STFT distance, mel distance, SI-SDR, MR-STFT distance.
      --config.checkpoint=RUN --config.data.root=ROOT
- inpainting: span inpainting of the first num_clips clips of an audio folder by each of `methods` on one diffusion
  run (musicdiff.eval.inpainting_eval): the kept region's log-mel distance beside the autoencoder's own
  reconstruction, and the seams at the span boundaries; `span` (fractions of the window), `seam_frames`, `generate`.
      --config.checkpoint=RUN --config.data.root=HELDOUT
Series: --config.checkpoints=RUN generates from every saved step of a diffusion run (settings in `generate`, a
configs/generate.py section; prompts from `prompts_file` or the first `num_prompts` reference captions) and
evaluates each; --config.series_dir=DIR evaluates existing sub-folders <step>/ or step_<step>/ of generations.
Both write OUT/step_<step>/report.*, OUT/series.json and the metric-vs-step plot OUT/series.png.

Keys (autoencoder):
- checkpoint: a training workdir, its checkpoints/ directory or one step's directory; step (-1: the latest);
  use_ema: score the EMA weights when the checkpoint has them.
- data: root; split ("heldout": the clips the trainer left out, "train", or "all" for a folder the model never saw);
  heldout_fraction (-1: the checkpoint's training value; converted checkpoints fall back to 0.1); normalize ("": as
  in training); max_seconds (0: whole clips); max_clips (0: all); the scan thresholds of configs/audio_folder.py.
- chunk_frames, overlap_frames: chunked encode/decode in latent frames (musicdiff.models.chunking).
- write_audio: also write the reconstructions to WORKDIR/reconstructions with a generations.jsonl index (captions,
  attributes), to evaluate them as the "autoencoded" reference row of a checkpoint series.

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
- crop_seconds: every generated and reference clip is cropped to its first crop_seconds before analysis (0 = the
  shortest clip of the evaluated sets and the reference; > 0 = that length, at most the shortest clip; < 0 = whole
  clips, e.g. for reference.stats computed from whole clips).
- bootstrap: resamples, fd_resamples, level, seed of the percentile-bootstrap intervals every metric carries
  (musicdiff.eval.intervals). FD recomputes a distance per resample: milliseconds at 64-d (embedded), up to ~1 s
  at 1024-d (OpenL3) with more frames than dimensions; lower fd_resamples there if that is too slow.
- prompts_dir: the audio folder whose first num_prompts clips give a series its prompts (captions and attributes,
  and the label distributions KL pairs each generation with;
  "" = reference.audio_dir, used when prompts_file is empty). With real_row those clips are the real row: keep it
  apart from the reference (held-out clips with other captions), so the ceiling is not the reference against itself.
- real_row: a series also evaluates real clips as a generation set (the "real" row, the ceiling): the prompt clips
  of prompts_dir when set, else the reference clips;
  reference_rows: further named rows "name=DIR,name=DIR" (e.g. autoencoded=DIR,step_0=DIR); see
  musicdiff.eval.evaluation_table. A series writes the table OUT/report.{json,md} with a verdict per metric.
- backbones.<name>: per-backbone settings; `python` runs that backbone in another interpreter (an environment
  where its package is installed; OpenL3's TensorFlow pins do not install beside JAX).
"""

import functools
from pathlib import Path

import ml_collections

from data_pipelines.audio_folder import scan_settings
from musicdiff.config import choose_preset, load_config, to_dict

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
    c.prompts_dir = ""
    generate_file = Path(__file__).resolve().parent / "generate.py"
    c.generate = ml_collections.ConfigDict(to_dict(load_config(f"{generate_file}:{GENERATE_PRESET[kind]}")))
    c.reference = ml_collections.ConfigDict(dict(audio_dir="", stats="", cache_dir="", pair_by="prompt",
                                                 max_clips=0))
    if kind == "generation":
        c.fd_backbone, c.kl_backbone, c.clap_backbone = "openl3", "passt", "clap"
    else:
        c.fd_backbone, c.kl_backbone, c.clap_backbone = "embedded", "embedded", ""
    c.prompt_following = True
    c.crop_seconds = 0.0
    c.bootstrap = ml_collections.ConfigDict(dict(resamples=1000, fd_resamples=1000, level=0.95, seed=0))
    c.real_row = False
    c.reference_rows = ""
    c.backbones = ml_collections.ConfigDict(dict(
        embedded=dict(checkpoint=""),
        # stable-audio-metrics: 44.1 kHz bandwidth, L/R embedded separately (1024-d), 1-s windows every 0.5 s
        openl3=dict(weights="", python="", content_type="music", sample_rate=44100, channels=2, hop_seconds=0.5),
        passt=dict(weights="", python="", device="cpu"),
        clap=dict(weights="", roberta_dir="", python="", device="cpu", seed=0),
    ))
    return c


def _autoencoder_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "autoencoder"
    c.checkpoint = ""
    c.step = -1
    c.use_ema = True
    c.chunk_frames = 128
    c.overlap_frames = 32
    c.write_audio = False  # also write the reconstructions (OUT/reconstructions, indexed like generations)
    c.data = ml_collections.ConfigDict(dict(
        root="",
        split="heldout",
        heldout_fraction=-1.0,
        normalize="",
        max_seconds=0.0,
        max_clips=0,
        **scan_settings(),
    ))
    return c


def _inpainting_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "inpainting"
    c.checkpoint = ""  # the diffusion run
    c.methods = "trained_input,repaint"  # "trained_input" needs a model trained with the inpainting input
    c.span = (0.375, 0.625)  # the regenerated span, as fractions of the window
    c.num_clips = 32
    c.seed = 0
    c.seam_frames = 8  # log-mel frames (256-sample hop) on each side of a span boundary
    c.generate = ml_collections.ConfigDict(to_dict(load_config(f"{Path(__file__).with_name('generate.py')}:demo")))
    c.bootstrap = ml_collections.ConfigDict(dict(resamples=1000, seed=0))
    c.data = ml_collections.ConfigDict(dict(root="", **scan_settings()))
    return c


PRESETS = {"generation": functools.partial(_generation_config, "generation"),
           "embedded": functools.partial(_generation_config, "embedded"),
           "autoencoder": _autoencoder_config,
           "inpainting": _inpainting_config}


def get_config(arg: str = "embedded") -> ml_collections.ConfigDict:
    return choose_preset(arg, PRESETS)()

"""Reconstruction evaluation of a trained (or converted) autoencoder on the held-out clips of an audio folder.

    python -m launch.evaluate --config=configs/evaluate.py:autoencoder --config.checkpoint=RUN \
        --config.data.root=ROOT --workdir=OUT

Each clip of the chosen split (`data.split`: "heldout" by default, the same path-hash split the trainer leaves out,
data_pipelines/splits.py) is decoded whole at the model's rate and channels, normalised as in training, encoded to
the posterior mean and decoded with the chunked encoder/decoder (musicdiff.models.chunking), and scored against
itself: STFT distance, mel distance, SI-SDR and the training-resolution MR-STFT distance
(musicdiff.eval.reconstruction, eval_and_control.md §A.7). Writes OUT/report.json and OUT/report.md (mean, std and
count per metric) and OUT/per_clip.json. With `write_audio`, the reconstructions also go to OUT/reconstructions/
(WAV at the model's rate) with a generations.jsonl index carrying each clip's caption and attributes, so they are
evaluated like generations (the "autoencoded" reference row of a checkpoint series, musicdiff.eval.evaluation_table).

Each clip is zero-padded at its end to a whole number of chunks (`chunk_frames` latent frames), so one compiled
program serves every clip of the same chunk count instead of one per length; scores use the clip's own samples.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.audio_folder import data_root, scan
from data_pipelines.splits import check_fraction, split_items
from musicdiff.audio.io import load_audio, normalization_gain, write_audio
from musicdiff.errors import ConfigError, DataError
from musicdiff.eval.generation_sets import AudioClip, write_index

log = logging.getLogger(__name__)
RECONSTRUCTIONS_DIR = "reconstructions"


def _inherited(value: Any, fallback: Any, unset: Any) -> Any:
    return fallback if value == unset else value


def _checkpoint(config: ml_collections.ConfigDict):
    from musicdiff.checkpoints import find_checkpoint
    from musicdiff.checkpoints import CheckpointError

    if not str(config.checkpoint):
        raise ConfigError("config.checkpoint is empty: pass --config.checkpoint=RUN (a training workdir, its "
                          "checkpoints/ directory or one step's directory)")
    try:
        return find_checkpoint(str(config.checkpoint), None if int(config.step) < 0 else int(config.step))
    except CheckpointError as err:
        raise ConfigError(f"config.checkpoint={config.checkpoint}: {err}") from None


def evaluate_autoencoder(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """The `autoencoder` kind of launch.evaluate (see the module docstring); returns the report's metrics."""
    from musicdiff.audio.metrics import reconstruction_metrics
    from musicdiff.eval.reconstruction import ASSUMPTIONS, aggregate, write_report
    from musicdiff.files import atomic_write_json
    from musicdiff.checkpoints import load_model
    from musicdiff.models.chunking import chunked_decode, chunked_encode
    from musicdiff.parallel.sharding import unsharded

    ref = _checkpoint(config)
    trained = ref.config
    if "autoencoder" not in trained:
        raise ConfigError(f"config.checkpoint={config.checkpoint}: {ref.step_dir} holds no autoencoder (its config "
                          f"has no 'autoencoder' section)")
    trained_data = trained.get("data", ml_collections.ConfigDict())
    fraction = check_fraction(_inherited(float(config.data.heldout_fraction),
                                         float(trained_data.get("heldout_fraction", 0.1)), -1.0))
    normalize = _inherited(str(config.data.normalize), str(trained_data.get("normalize", "none")), "")
    weights = "ema" if config.use_ema and ref.has_subtree("ema/autoencoder") else "params"
    model = load_model(ref, "autoencoder", prefer_ema=bool(config.use_ema))
    rate, channels = int(model.config.sample_rate), int(model.config.in_channels)
    chunk, overlap = int(config.chunk_frames), int(config.overlap_frames)
    window = chunk * model.downsampling_ratio

    items = split_items(scan(config).items, fraction, str(config.data.split))
    if int(config.data.max_clips) > 0:
        items = items[: int(config.data.max_clips)]
    if not items:
        raise DataError(f"{data_root(config)}: the '{config.data.split}' split is empty (heldout_fraction={fraction}); "
                        f"pick another --config.data.split or set --config.data.heldout_fraction")
    max_samples = int(float(config.data.max_seconds) * rate) or None
    per_clip, reconstructions = [], []
    out_audio = Path(workdir) / RECONSTRUCTIONS_DIR
    for index, item in enumerate(items):
        audio = load_audio(item.path, rate, channels, 0, max_samples)
        gain = normalization_gain(normalize, item.peak_db, item.rms_db)
        audio = audio * np.float32(gain)
        length = audio.shape[1]
        padded = np.zeros((1, channels, max(1, math.ceil(length / window)) * window), np.float32)
        padded[0, :, :length] = audio
        with unsharded():
            latents, _ = chunked_encode(model, jnp.asarray(padded), chunk_frames=chunk, overlap_frames=overlap)
            decoded = np.asarray(chunked_decode(model, latents, chunk_frames=chunk, overlap_frames=overlap))
        estimate = decoded[0, :, :length]
        if not np.all(np.isfinite(estimate)):
            raise DataError(f"{item.path}: the reconstruction is not finite; the checkpoint {ref.step_dir} is broken")
        scores = reconstruction_metrics(audio, estimate, rate)
        if bool(config.get("write_audio", False)):
            path = out_audio / f"{index:03d}.wav"
            write_audio(path, estimate, rate, subtype="FLOAT")  # unclipped, as scored
            reconstructions.append(AudioClip(path, item.caption, item.caption, dict(item.attributes)))
        per_clip.append({"path": item.relpath, "seconds": length / rate, **scores})
        log.info("[%d/%d] %s: %s", index + 1, len(items), item.relpath,
                 ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    summary = aggregate([{k: v for k, v in clip.items() if k not in ("path", "seconds")} for clip in per_clip])
    notes = [
        f"checkpoint {ref.step_dir} (step {ref.step}), {weights} weights",
        f"{len(per_clip)} clips of the '{config.data.split}' split of {data_root(config)} "
        f"(heldout_fraction {fraction}), {sum(c['seconds'] for c in per_clip):.1f} s in all, normalize={normalize}",
        f"chunked encode/decode: {chunk} latent frames per chunk, {overlap} overlap; posterior mean latents",
        *ASSUMPTIONS,
    ]
    write_report(summary, workdir, "Autoencoder reconstruction", notes=notes,
                 fields={"step": ref.step, "clips": len(per_clip)})
    atomic_write_json(Path(workdir) / "per_clip.json", per_clip)
    if reconstructions:
        write_index(out_audio, reconstructions)
    return {"step": ref.step, "clips": len(per_clip), "metrics": summary}


__all__ = ["evaluate_autoencoder"]

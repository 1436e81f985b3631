"""Import Stable Audio 3 checkpoints into musicdiff, and export musicdiff checkpoints back (stable_audio_3.md §9).

    import_stable_audio_3("model_config.json", "model.safetensors", "OUT")
        -> OUT/autoencoder   the SAME autoencoder ("same"), config = an autoencoder training config
           OUT/diffusion     the DiT with its SA3 options + the conditioner (seconds embedder, learned prompt
                             padding), config = a diffusion config whose autoencoder_checkpoint is OUT/autoencoder
    An AE-only model (the `stabilityai/SAME-S` / `SAME-L` repos: model_type "autoencoder", keys without prefix) gives
    OUT/autoencoder alone.
    export_stable_audio_3("EXPORT", diffusion="OUT/diffusion")  -> EXPORT/model.safetensors + model_config.json

The machinery is the Stable Audio converter's (stable_audio.py): every key of the file is matched against the tensor
rules (same_keys.py for SAME, stable_audio_keys.py for the DiT and conditioner, which cover the SA3 options) before
anything is written; half-precision files import (each value is a float32 value; fixed buffers such as the rotary
`inv_freq` are compared at the precision of their dtype); a tensor holding NaN or inf is refused by name. The
configs are translated by stable_audio_3_config.py.

T5Gemma is no part of an SA3 checkpoint: the diffusion config's `prompt_encoder.path` names the Hugging Face
directory of google/t5gemma-b-b-ul2 (or --t5gemma), loaded at generation time as the reference does.

LoRA files (the reference's adapter safetensors) convert with convert/sa3_lora.py against a converted diffusion
checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from musicdiff.convert.stable_audio import (Exported, Imported, export_checkpoint, import_checkpoint,
                                            read_model_config)
from musicdiff.convert.stable_audio_3_config import import_configs, reference_model_config, sampling_time_shift


def import_stable_audio_3(model_config: str | Path, checkpoint: str | Path, workdir: str | Path, *,
                          t5gemma_path: str | None = None, compute_dtype: str = "float32") -> Imported:
    """Converts a Stable Audio 3 model (full or AE-only) into OUT/autoencoder (and OUT/diffusion)."""
    return import_checkpoint(model_config, checkpoint, workdir, lambda reference, autoencoder_checkpoint: import_configs(
        reference, autoencoder_checkpoint=autoencoder_checkpoint, t5gemma_path=t5gemma_path,
        compute_dtype=compute_dtype, where=str(model_config)))


def generation_flags(model_config: str | Path) -> list[str]:
    """launch.generate flags giving the time shift the reference samples this model with (its
    sampling_distribution_shift_options, else its LogSNR default); musicdiff checkpoints do not store one."""
    shift = sampling_time_shift(read_model_config(model_config))
    return [f"--config.time_shift.{key}={value}" for key, value in shift.items()]


def export_stable_audio_3(workdir: str | Path, *, diffusion: str | Path | None = None,
                          autoencoder: str | Path | None = None, use_ema: bool = True) -> Exported:
    """Writes workdir/model.safetensors + workdir/model_config.json in Stable Audio 3's layout: a diffusion_cond
    model for `diffusion` (with its autoencoder_checkpoint, or `autoencoder`), or an AE-only SAME model."""
    def reference_config(diffusion_config, ae_section, ae_config):
        sample_size = int(ae_config.get("data", {}).get("sample_size", 0))
        return reference_model_config(diffusion_config, ae_section, sample_size)

    return export_checkpoint(workdir, reference_config, diffusion=diffusion, autoencoder=autoencoder, use_ema=use_ema)


__all__ = ["export_stable_audio_3", "generation_flags", "import_stable_audio_3"]

"""launch.convert's one call: import a Stable Audio (stable-audio-tools) or Stable Audio 3 checkpoint into musicdiff
checkpoints, or export one back."""

from __future__ import annotations

from musicdiff.errors import ConfigError

FORMATS = ("stable_audio", "stable_audio_3")


def convert_checkpoint(*, workdir: str | None, from_format: str | None = None, to_format: str | None = None,
                       model_config: str | None = None, checkpoint: str | None = None, t5: str | None = None,
                       t5gemma: str | None = None, dtype: str = "float32", diffusion: str | None = None,
                       autoencoder: str | None = None, use_ema: bool = True, lora: str | None = None) -> None:
    """Import (`from_format`: writes WORKDIR/autoencoder and, for diffusion models, WORKDIR/diffusion) or export
    (`to_format`: writes WORKDIR/model.safetensors + model_config.json); prints what it wrote. With `lora`
    (stable_audio_3 only) an adapter file converts instead, against the converted `diffusion` checkpoint: import
    writes WORKDIR/adapter.safetensors, export WORKDIR/lora.safetensors."""
    from musicdiff.convert.stable_audio import export_stable_audio, import_stable_audio
    from musicdiff.convert.stable_audio_3 import export_stable_audio_3, generation_flags, import_stable_audio_3

    if (from_format is None) == (to_format is None):
        raise ConfigError(f"pass exactly one of --from=FORMAT (import) or --to=FORMAT (export); formats: "
                          f"{', '.join(FORMATS)}")
    if workdir is None:
        raise ConfigError("--workdir is required: the directory the converted files go to")
    if lora is not None:
        print(f"wrote {_convert_lora(lora, from_format or to_format, diffusion, workdir, to_format is not None)}")
        return
    if from_format is not None:
        if not model_config or not checkpoint:
            raise ConfigError("import needs --model_config=model_config.json and --checkpoint=model.safetensors")
        if from_format == "stable_audio_3":
            result = import_stable_audio_3(model_config, checkpoint, workdir, t5gemma_path=t5gemma,
                                           compute_dtype=dtype)
        else:
            result = import_stable_audio(model_config, checkpoint, workdir, t5_path=t5, compute_dtype=dtype)
        print(f"autoencoder checkpoint: {result.autoencoder}")
        if result.diffusion is not None:
            print(f"diffusion checkpoint: {result.diffusion}")
            if from_format == "stable_audio_3":
                print("the reference samples it with: " + " ".join(generation_flags(model_config)))
        return
    export = export_stable_audio_3 if to_format == "stable_audio_3" else export_stable_audio
    exported = export(workdir, diffusion=diffusion, autoencoder=autoencoder, use_ema=use_ema)
    print(f"wrote {exported.safetensors} and {exported.model_config}")


def _convert_lora(lora: str, file_format: str, diffusion: str | None, workdir: str, export: bool):
    """A Stable Audio 3 LoRA file to a musicdiff adapter file (or back), fitted to the DiT of `diffusion`."""
    from pathlib import Path

    from musicdiff.checkpoints import find_checkpoint
    from musicdiff.convert.sa3_lora import convert_sa3_lora_file, diffusion_base, export_sa3_lora_file

    if file_format != "stable_audio_3":
        raise ConfigError(f"--lora converts Stable Audio 3 LoRA files; pass --from=stable_audio_3 or "
                          f"--to=stable_audio_3 (not {file_format})")
    if diffusion is None:
        raise ConfigError("--lora needs --diffusion=DIR, the converted diffusion checkpoint the adapter belongs to "
                          "(launch.convert --from=stable_audio_3 ... writes OUT/diffusion)")
    config = find_checkpoint(diffusion).config

    def base():  # LoRA-XS bases are the base weights' singular vectors: only then are the (large) weights read
        return diffusion_base(diffusion)[1]

    directory = Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    if export:
        return export_sa3_lora_file(lora, directory / "lora.safetensors", config, base)
    return convert_sa3_lora_file(lora, directory / "adapter.safetensors", config, base)

"""launch.convert's one call: import a Stable Audio checkpoint into musicdiff checkpoints, or export one back."""

from __future__ import annotations

from musicdiff.errors import ConfigError

FORMATS = ("stable_audio",)


def convert_checkpoint(*, workdir: str | None, from_format: str | None = None, to_format: str | None = None,
                       model_config: str | None = None, checkpoint: str | None = None, t5: str | None = None,
                       dtype: str = "float32", diffusion: str | None = None, autoencoder: str | None = None,
                       use_ema: bool = True) -> None:
    """Import (`from_format`: writes WORKDIR/autoencoder and, for diffusion models, WORKDIR/diffusion) or export
    (`to_format`: writes WORKDIR/model.safetensors + model_config.json); prints what it wrote."""
    from musicdiff.convert.stable_audio import export_stable_audio, import_stable_audio

    if (from_format is None) == (to_format is None):
        raise ConfigError("pass exactly one of --from=stable_audio (import) or --to=stable_audio (export)")
    if workdir is None:
        raise ConfigError("--workdir is required: the directory the converted files go to")
    if from_format is not None:
        if not model_config or not checkpoint:
            raise ConfigError("import needs --model_config=model_config.json and --checkpoint=model.safetensors")
        result = import_stable_audio(model_config, checkpoint, workdir, t5_path=t5, compute_dtype=dtype)
        print(f"autoencoder checkpoint: {result.autoencoder}")
        if result.diffusion is not None:
            print(f"diffusion checkpoint: {result.diffusion}")
        return
    exported = export_stable_audio(workdir, diffusion=diffusion, autoencoder=autoencoder, use_ema=use_ema)
    print(f"wrote {exported.safetensors} and {exported.model_config}")

"""Stable Audio 3 `model_config.json` <-> musicdiff configs (stable_audio_3.md §9.1, §2, §3, §3.6).

Import reads the reference JSON (`model_type` "diffusion_cond", or "autoencoder" for the AE-only `stabilityai/SAME-*`
repos, whose encoder/decoder blocks sit directly under "model") into full musicdiff configs built from the presets:
- autoencoder: `configs/autoencoder.py:same_s` with its `autoencoder` section ("same", models/same.py) translated
  from the SAMEEncoder / SAMEDecoder / SoftNormBottleneck / PatchedPretransform kwargs;
- diffusion: `configs/diffusion.py:sa3_small` with `model` (the DiT's SA3 options) from the DiffusionTransformer
  kwargs, the `t5gemma` prompt and `number` conditioners, their routing, `objective.name` = diffusion_objective and
  `objective.time_shift` = distribution_shift_options (training), `objective.mask_padding` = mask_padding_attention,
  `data.latent_length` = sample_size / 4096.
The reference's generation-time shift (`sampling_distribution_shift_options`, else its LogSNR default) is no part of
a musicdiff checkpoint (generation takes it from configs/generate.py's `time_shift`): `sampling_time_shift` returns
it so that the converter can print the flags that reproduce it.

The reference constructors' defaults fill what a JSON leaves out. Every option is translated or refused with a
ConfigError naming it; options that act only in training (checkpointing, freezing, mask_noise) are accepted and
have no effect on converted weights. `noise_regularize` adds Gaussian noise of 1e-3·running_std when the reference
decodes in eval mode; musicdiff decodes deterministically (the noise is 1e-3 of the latents' scale).
Export (`reference_model_config`) is the inverse.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

from musicdiff.convert.stable_audio_config import _check_fixed, _check_known, _get, _plain, preset
from musicdiff.errors import ConfigError

MODEL_TYPES = ("diffusion_cond", "autoencoder")
OBJECTIVES = ("rectified_flow", "rf_denoiser", "v")
T5GEMMA_DEFAULT_MAX_LENGTH = 128  # T5GemmaConditioner's default (the released pipelines pass 256)
T5GEMMA_MODEL = "google/t5gemma-b-b-ul2"

# TransformerResamplingBlock defaults (stable-audio-3 at 636f906) and the values musicdiff's SAME implements.
TRB_DEFAULTS = dict(chunk_size=128, chunk_midpoint_shift=False, dim_heads=128, differential=True,
                    variable_stride=False, ff_mult=3, conv_mapping=False, sliding_window=None, sinusoidal_blocks=[0])
TRB_FIXED = dict(conformer=False, layer_scale=False, causal=False, feat_scale=False, cross_attn=False, dyt=True,
                 mapping_bias=True)
TRB_TRAINING_ONLY = ("checkpointing", "freeze_backbone", "mask_noise")
SAME_TRANSLATED = ("in_channels", "out_channels", "channels", "c_mults", "strides", "transformer_depths",
                   "latent_dim", *TRB_DEFAULTS)
BOTTLENECK_KNOWN = {"dim", "noise_augment_dim", "noise_regularize", "auto_scale", "freeze"}

# DiffusionTransformer / ContinuousTransformer / TransformerBlock options (reference default -> musicdiff field).
DIT_FIXED = dict(patch_size=1, prepend_cond_dim=0, transformer_type="continuous_transformer",
                 timestep_cond_type="global", project_global_cond=True, rotary_pos_emb=True,
                 cross_attn_rotary_pos_emb=False, conformer=False, use_abs_pos_emb=False, sliding_window=None,
                 final_cross_attn_ix=-1, causal=False, layer_scale=False, modular_local_cond_configs=None)
DIT_INIT_ONLY = ("zero_init_branch_outputs", "abs_pos_emb_max_length", "timestep_embed_dim")
DIT_FIELDS = dict(io_channels="io_channels", embed_dim="embed_dim", depth="depth", num_heads="num_heads",
                  cond_token_dim="cond_token_dim", global_cond_dim="global_cond_dim",
                  project_cond_tokens="project_cond_tokens", input_concat_dim="input_concat_dim",
                  timestep_features_dim="timestep_features_dim", timestep_features_logsnr="timestep_features_logsnr",
                  num_memory_tokens="num_memory_tokens", local_add_cond_dim="local_cond_dim",
                  use_sinusoidal_emb="sinusoidal_embedding")
DIT_DEFAULTS = dict(project_cond_tokens=True, input_concat_dim=0, timestep_features_dim=256,
                    timestep_features_logsnr=False, num_memory_tokens=0, local_add_cond_dim=0,
                    use_sinusoidal_emb=False, global_cond_type="prepend", timestep_features_type="learned",
                    norm_type="layer_norm")
BLOCK_TYPES = {"adaLN": "sa3_adaln", "prepend": "sao"}
ATTN_FIXED = dict(feat_scale=False, causal=False)
FF_FIXED = dict(no_bias=False, glu=True, use_conv=False, sinusoidal=False)
INPAINT_IDS = ["inpaint_mask", "inpaint_masked_input"]

# The reference's distribution-shift kwargs per family (inference/distribution_shift.py, with its defaults) and the
# musicdiff TimeShift option each one is.
SHIFT_OPTIONS = {
    "full": dict(base_shift=("base", 0.5), max_shift=("max_shift", 1.15), min_length=("min_length", 256),
                 max_length=("max_length", 4096)),
    "flux": dict(min_length=("min_length", 256), max_length=("max_length", 4096), alpha_min=("alpha_min", 1.0),
                 alpha_max=("alpha_max", 1.0)),
    "logsnr": dict(anchor_length=("anchor_length", 2000), anchor_logsnr=("anchor_logsnr", -6.2),
                   rate=("rate", 1.0), logsnr_end=("logsnr_end", 2.0)),
    "none": {},
}
# ConditionedDiffusionModelWrapper's sampling shift when the config names none.
DEFAULT_SAMPLING_SHIFT = dict(type="logsnr", rate=0.0, anchor_logsnr=-6.2, logsnr_end=2.0)


# ---- SAME ----------------------------------------------------------------------------------------------------

def _trb(side: Mapping[str, Any], where: str) -> dict[str, Any]:
    _check_fixed(side, TRB_FIXED, where)
    _check_known(side, set(SAME_TRANSLATED) | set(TRB_FIXED) | set(TRB_TRAINING_ONLY), where)
    values = {**TRB_DEFAULTS, **side}
    for key in ("c_mults", "strides", "transformer_depths"):
        if len(_get(values, key, where)) != 1:
            raise ConfigError(f"{where}.{key}={values[key]}: SAME has one resampling block per side")
    return values


def same_section(model: Mapping[str, Any], sample_rate: int, where: str) -> dict[str, Any]:
    """The musicdiff `autoencoder` section of a reference autoencoder block (encoder, decoder, bottleneck,
    pretransform, latent_dim, downsampling_ratio, io_channels)."""
    _check_known(model, {"encoder", "decoder", "bottleneck", "pretransform", "latent_dim", "downsampling_ratio",
                         "io_channels", "in_channels", "out_channels"}, where)
    encoder = _trb(_get(_get(model, "encoder", where), "config", f"{where}.encoder"), f"{where}.encoder.config")
    decoder_block = _get(model, "decoder", where)
    _check_known(decoder_block, {"type", "config", "soft_clip"}, f"{where}.decoder")
    decoder = _trb(_get(decoder_block, "config", f"{where}.decoder"), f"{where}.decoder.config")
    patching = dict(_get(_get(model, "pretransform", where), "config", f"{where}.pretransform"))
    _check_known(patching, {"channels", "patch_size", "oversampling", "postfilter_channels"},
                 f"{where}.pretransform.config")
    _check_fixed(patching, dict(oversampling=1, postfilter_channels=0), f"{where}.pretransform.config")
    channels, patch = int(_get(patching, "channels", where)), int(_get(patching, "patch_size", where))
    for side, key in ((encoder, "in_channels"), (decoder, "out_channels")):
        if int(side.get(key, 2)) != channels * patch:
            raise ConfigError(f"{where}: the {key} of the resampling block is {side.get(key, 2)}, but patching "
                              f"{channels} channels by {patch} gives {channels * patch}")
    shared = ("channels", "c_mults", "strides", "latent_dim", "dim_heads", "ff_mult", "differential",
              "variable_stride", "sliding_window", "chunk_size", "chunk_midpoint_shift")
    differing = [key for key in shared if encoder.get(key) != decoder.get(key)]
    if differing:
        raise ConfigError(f"{where}: encoder and decoder differ in {differing[0]} ({encoder.get(differing[0])!r} vs "
                          f"{decoder.get(differing[0])!r}); musicdiff's SAME shares these options")
    window = encoder["sliding_window"]
    if window is not None and (len(window) != 2 or window[0] != window[1]):
        raise ConfigError(f"{where}.encoder.config.sliding_window={window}: only symmetric windows [w, w] convert")
    bottleneck = dict(_get(_get(model, "bottleneck", where), "config", f"{where}.bottleneck"))
    _check_known(bottleneck, BOTTLENECK_KNOWN, f"{where}.bottleneck.config")
    if not bottleneck.get("auto_scale", False) or int(bottleneck.get("noise_augment_dim", 0)):
        raise ConfigError(f"{where}.bottleneck.config: musicdiff's SoftNorm bottleneck has a running std "
                          f"(auto_scale=true) and no noise channels (noise_augment_dim=0)")
    latent_dim = int(_get(encoder, "latent_dim", where))
    if int(bottleneck.get("dim", latent_dim)) != latent_dim:
        raise ConfigError(f"{where}.bottleneck.config.dim={bottleneck['dim']}: the encoder's latent_dim is "
                          f"{latent_dim}")
    stride = int(encoder["strides"][0])
    ratio = int(model.get("downsampling_ratio", patch * stride))
    if ratio != patch * stride:
        raise ConfigError(f"{where}.downsampling_ratio={ratio}: patch {patch} x stride {stride} is {patch * stride}")
    return dict(
        name="same", sample_rate=int(sample_rate), in_channels=channels, out_channels=channels, patch_size=patch,
        strides=(stride,), width=int(encoder["channels"]) * int(encoder["c_mults"][0]), latent_dim=latent_dim,
        encoder_depth=int(encoder["transformer_depths"][0]), decoder_depth=int(decoder["transformer_depths"][0]),
        head_dim=int(encoder["dim_heads"]), ff_mult=int(encoder["ff_mult"]),
        attention="sliding_window" if window is not None else "chunked",
        chunk_size=int(encoder["chunk_size"]), chunk_midpoint_shift=bool(encoder["chunk_midpoint_shift"]),
        sliding_window=int(window[0]) if window is not None else 1, differential=bool(encoder["differential"]),
        variable_stride=bool(encoder["variable_stride"]),
        encoder_mapping_kernel=3 if encoder["conv_mapping"] else 1,
        decoder_mapping_kernel=3 if decoder["conv_mapping"] else 1,
        decoder_sinusoidal_blocks=int(decoder["sinusoidal_blocks"][0]),
        soft_clip=bool(decoder_block.get("soft_clip", False)))


def reference_same(section: Mapping[str, Any]) -> dict[str, Any]:
    """The reference autoencoder block of a musicdiff "same" section."""
    patch, channels, stride = int(section["patch_size"]), int(section["in_channels"]), int(section["strides"][0])
    window = section["attention"] == "sliding_window"
    common = dict(channels=int(section["width"]), c_mults=[1], strides=[stride], latent_dim=int(section["latent_dim"]),
                  dim_heads=int(section["head_dim"]), ff_mult=int(section["ff_mult"]),
                  differential=bool(section["differential"]), variable_stride=bool(section["variable_stride"]),
                  dyt=True, sliding_window=[int(section["sliding_window"])] * 2 if window else None,
                  chunk_size=int(section["chunk_size"]), chunk_midpoint_shift=bool(section["chunk_midpoint_shift"]))
    decoder = dict(type="same", config=dict(out_channels=channels * patch,
                                            transformer_depths=[int(section["decoder_depth"])],
                                            conv_mapping=int(section["decoder_mapping_kernel"]) == 3,
                                            sinusoidal_blocks=[int(section["decoder_sinusoidal_blocks"])], **common))
    if section["soft_clip"]:
        decoder["soft_clip"] = True
    return dict(
        encoder=dict(type="same", config=dict(in_channels=channels * patch,
                                              transformer_depths=[int(section["encoder_depth"])],
                                              conv_mapping=int(section["encoder_mapping_kernel"]) == 3, **common)),
        decoder=decoder,
        bottleneck=dict(type="softnorm", config=dict(dim=int(section["latent_dim"]), auto_scale=True)),
        pretransform=dict(type="patched", config=dict(channels=channels, patch_size=patch)),
        latent_dim=int(section["latent_dim"]), downsampling_ratio=patch * stride, io_channels=channels)


def autoencoder_config(section: Mapping[str, Any], sample_size: int) -> ml_collections.ConfigDict:
    """A full autoencoder training config (configs/autoencoder.py:same_s) around a converted section."""
    config = preset("autoencoder.py", "same_s")
    config.autoencoder = ml_collections.ConfigDict(dict(section, bottleneck=dict(type="softnorm")))
    config.data.sample_rate = int(section["sample_rate"])
    ratio = int(section["patch_size"]) * int(section["strides"][0])
    if sample_size and sample_size % ratio == 0:
        config.data.sample_size = int(sample_size)
    config.lock()
    return config


# ---- DiT, conditioning and schedules ---------------------------------------------------------------------------

def dit_section(dit: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The musicdiff DiT options of the reference DiffusionTransformer kwargs."""
    _check_fixed(dit, DIT_FIXED, where)
    known = (set(DIT_FIELDS) | set(DIT_FIXED) | set(DIT_INIT_ONLY) | set(DIT_DEFAULTS)
             | {"attn_kwargs", "ff_kwargs", "norm_kwargs", "dim_heads", "diffusion_objective"})
    _check_known(dit, known, where)
    values = {**DIT_DEFAULTS, **dit}
    out = {ours: values[theirs] for theirs, ours in DIT_FIELDS.items() if theirs in values}
    for key in ("io_channels", "embed_dim", "depth", "num_heads"):
        _get(dit, key, where)
    if values["global_cond_type"] not in BLOCK_TYPES:
        raise ConfigError(f"{where}.global_cond_type={values['global_cond_type']!r}: expected adaLN or prepend")
    out["block_type"] = BLOCK_TYPES[values["global_cond_type"]]
    if values["timestep_features_type"] not in ("learned", "expo"):
        raise ConfigError(f"{where}.timestep_features_type={values['timestep_features_type']!r}: expected learned "
                          f"or expo")
    out["timestep_features_type"] = values["timestep_features_type"]
    if values["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ConfigError(f"{where}.norm_type={values['norm_type']!r}: musicdiff's DiT has layer_norm and rms_norm")
    out["norm_type"] = values["norm_type"]
    head_dim = int(dit["embed_dim"]) // int(dit["num_heads"])
    if int(dit.get("dim_heads", head_dim)) != head_dim:
        raise ConfigError(f"{where}.dim_heads={dit['dim_heads']}: must be embed_dim / num_heads = {head_dim}")
    attn = dict(dit.get("attn_kwargs", {}))
    _check_fixed(attn, ATTN_FIXED, f"{where}.attn_kwargs")
    _check_known(attn, {"qk_norm", "differential", "qk_norm_eps", *ATTN_FIXED}, f"{where}.attn_kwargs")
    qk_norm = attn.get("qk_norm", "none")
    if qk_norm not in ("none", "ln", "rms"):
        raise ConfigError(f"{where}.attn_kwargs.qk_norm={qk_norm!r}: musicdiff's DiT has none, ln and rms")
    if float(attn.get("qk_norm_eps", 1e-6)) != 1e-6:
        raise ConfigError(f"{where}.attn_kwargs.qk_norm_eps={attn['qk_norm_eps']}: only 1e-6 converts")
    out.update(qk_norm=qk_norm, differential_attention=bool(attn.get("differential", False)))
    ff = dict(dit.get("ff_kwargs", {}))
    _check_fixed(ff, FF_FIXED, f"{where}.ff_kwargs")
    _check_known(ff, {"mult", *FF_FIXED}, f"{where}.ff_kwargs")
    out["ff_mult"] = int(ff.get("mult", 4))
    norm = dict(dit.get("norm_kwargs", {}))
    _check_known(norm, {"eps"}, f"{where}.norm_kwargs")
    out["layer_norm_eps"] = float(norm.get("eps", 1e-5))
    out["use_cross_attn_mask"] = False  # the reference ignores the cross-attention mask (spec §3.4)
    return out


def reference_dit(model: Mapping[str, Any]) -> dict[str, Any]:
    """The reference DiffusionTransformer kwargs of a musicdiff DiT section."""
    out = {theirs: _plain(model[ours]) for theirs, ours in DIT_FIELDS.items()}
    out.update(global_cond_type={v: k for k, v in BLOCK_TYPES.items()}[model["block_type"]],
               timestep_features_type=model["timestep_features_type"], norm_type=model["norm_type"],
               attn_kwargs=dict(qk_norm=model["qk_norm"], differential=bool(model["differential_attention"])),
               ff_kwargs=dict(mult=int(model["ff_mult"])), norm_kwargs=dict(eps=float(model["layer_norm_eps"])))
    return out


def shift_section(options: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """musicdiff TimeShift options of a reference distribution-shift block (None: "none")."""
    if not options:
        return dict(name="none")
    values = dict(options)
    family = values.pop("type", "full")
    if family not in SHIFT_OPTIONS:
        raise ConfigError(f"{where}.type={family!r}: expected one of {', '.join(SHIFT_OPTIONS)}")
    _check_known(values, set(SHIFT_OPTIONS[family]) | ({"use_sine"} if family == "full" else set()), where)
    if values.get("use_sine", False):
        raise ConfigError(f"{where}.use_sine=true: the sine variant of the full shift is not implemented")
    return dict(name=family, **{ours: float(values.get(theirs, default))
                                for theirs, (ours, default) in SHIFT_OPTIONS[family].items()})


def reference_shift(section: Mapping[str, Any]) -> dict[str, Any] | None:
    family = section.get("name", "none")
    if family == "none":
        return None
    return dict(type=family, **{theirs: float(section[ours]) for theirs, (ours, _) in SHIFT_OPTIONS[family].items()})


def sampling_time_shift(reference: Mapping[str, Any]) -> dict[str, Any]:
    """The generation-time shift the reference samples this model with, as musicdiff TimeShift options."""
    diffusion = reference.get("model", {}).get("diffusion", {})
    options = diffusion.get("sampling_distribution_shift_options") or DEFAULT_SAMPLING_SHIFT
    return shift_section(options, "model_config.json:model.diffusion.sampling_distribution_shift_options")


def conditioner_sections(model: Mapping[str, Any], diffusion: Mapping[str, Any], t5gemma_path: str | None,
                         where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(conditioner section, prompt_encoder section) of the reference `conditioning` block and routing."""
    conditioning = _get(model, "conditioning", where)
    _check_known(conditioning, {"configs", "cond_dim", "default_keys", "pre_encoded_keys"}, f"{where}.conditioning")
    if conditioning.get("pre_encoded_keys"):
        raise ConfigError(f"{where}.conditioning.pre_encoded_keys: not supported; encode these conditions")
    cond_dim = int(_get(conditioning, "cond_dim", f"{where}.conditioning"))
    entries, prompt_encoder = [], dict(name="none")
    for entry in _get(conditioning, "configs", f"{where}.conditioning"):
        kind, cond_id, options = entry.get("type"), entry.get("id"), dict(entry.get("config", {}))
        place = f"{where}.conditioning.{cond_id}"
        if kind == "number":
            _check_known(options, {"output_dim", "min_val", "max_val", "fourier_features_type"}, place)
            entries.append(dict(id=cond_id, type="number", config=dict(
                min_val=float(options.get("min_val", 0)), max_val=float(options.get("max_val", 1)),
                fourier_features_type=options.get("fourier_features_type", "learned"))))
        elif kind == "t5gemma":
            _check_known(options, {"output_dim", "model_name", "max_length", "enable_grad", "project_out",
                                   "padding_mode", "model_path", "repo_id", "subfolder"}, place)
            if options.get("enable_grad") or options.get("project_out"):
                raise ConfigError(f"{place}: a fine-tuned or projected T5Gemma (enable_grad / project_out) does not "
                                  f"convert; musicdiff keeps the encoder frozen outside the checkpoint")
            if prompt_encoder["name"] != "none":
                raise ConfigError(f"{place}: a second t5gemma conditioner; musicdiff has one prompt encoder")
            max_length = int(options.get("max_length", T5GEMMA_DEFAULT_MAX_LENGTH))
            name = options.get("model_name", T5GEMMA_MODEL)
            entries.append(dict(id=cond_id, type="t5gemma", config=dict(
                t5gemma_model_name=name, max_length=max_length, padding_mode=options.get("padding_mode", "zero"))))
            prompt_encoder = dict(name="t5gemma", path=t5gemma_path or options.get("model_path") or name,
                                  max_length=max_length, dtype="float32", param_dtype="float32")
        else:
            raise ConfigError(f"{place}: type {kind!r}; Stable Audio 3 models convert with t5gemma and number "
                              f"conditioners")
    for key in ("input_concat_ids", "prepend_cond_ids"):
        if diffusion.get(key):
            raise ConfigError(f"{where}.diffusion.{key}: not supported by the musicdiff DiT")
    local = list(diffusion.get("local_add_cond_ids", []))
    if local and local != INPAINT_IDS:
        raise ConfigError(f"{where}.diffusion.local_add_cond_ids={local}: musicdiff's local input is the inpainting "
                          f"pair {INPAINT_IDS}")
    conditioner = dict(name="multi_conditioner", conditioning=dict(configs=entries, cond_dim=cond_dim),
                       cross_attention_cond_ids=tuple(diffusion.get("cross_attention_cond_ids", ())),
                       global_cond_ids=tuple(diffusion.get("global_cond_ids", ())))
    return conditioner, prompt_encoder


def diffusion_config(reference: Mapping[str, Any], *, autoencoder_checkpoint: str, t5gemma_path: str | None,
                     compute_dtype: str, where: str) -> ml_collections.ConfigDict:
    model = _get(reference, "model", where)
    diffusion = _get(model, "diffusion", f"{where}.model")
    _check_known(diffusion, {"type", "config", "diffusion_objective", "cross_attention_cond_ids", "global_cond_ids",
                             "input_concat_ids", "local_add_cond_ids", "prepend_cond_ids", "modular_local_cond_configs",
                             "distribution_shift_options", "sampling_distribution_shift_options",
                             "mask_padding_attention", "use_effective_length_for_schedule"}, f"{where}.model.diffusion")
    if diffusion.get("modular_local_cond_configs"):
        raise ConfigError(f"{where}.model.diffusion.modular_local_cond_configs: not supported by the musicdiff DiT")
    objective = diffusion.get("diffusion_objective", "v")
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}.model.diffusion.diffusion_objective={objective!r}: expected one of "
                          f"{', '.join(OBJECTIVES)}")
    config = preset("diffusion.py", "sa3_small")
    dit = dit_section(_get(diffusion, "config", f"{where}.model.diffusion"), f"{where}.model.diffusion.config")
    config.model.update(dit, dtype=compute_dtype, param_dtype="float32", remat="none")
    if int(model.get("io_channels", dit["io_channels"])) != dit["io_channels"]:
        raise ConfigError(f"{where}.model.io_channels={model['io_channels']} differs from the DiT's "
                          f"{dit['io_channels']}")
    conditioner, prompt_encoder = conditioner_sections(model, diffusion, t5gemma_path, f"{where}.model")
    config.conditioner = ml_collections.ConfigDict(conditioner)
    config.prompt_encoder = ml_collections.ConfigDict(prompt_encoder)
    config.objective.name = objective
    config.objective.time_shift = ml_collections.ConfigDict(
        shift_section(diffusion.get("distribution_shift_options"), f"{where}.model.diffusion."
                                                                    f"distribution_shift_options"))
    config.objective.mask_padding = bool(diffusion.get("mask_padding_attention", False))
    ratio = int(_get(_get(model, "pretransform", f"{where}.model")["config"], "downsampling_ratio", where))
    sample_size = int(reference.get("sample_size", ratio * config.data.latent_length))
    config.data.latent_length = -(-sample_size // ratio)
    entries = {e["id"]: e for e in conditioner["conditioning"]["configs"]}
    config.data.cond_tokens = sum(int(entries[i]["config"]["max_length"]) if entries[i]["type"] == "t5gemma" else 1
                                  for i in conditioner["cross_attention_cond_ids"])
    config.data.sample_rate = int(_get(reference, "sample_rate", where))
    config.autoencoder_checkpoint = autoencoder_checkpoint
    config.lock()
    return config


def import_configs(reference: Mapping[str, Any], *, autoencoder_checkpoint: str, t5gemma_path: str | None = None,
                   compute_dtype: str = "float32", where: str = "model_config.json"
                   ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict | None]:
    """(autoencoder config, diffusion config or None for an AE-only model_config)."""
    model_type = _get(reference, "model_type", where)
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{where}.model_type={model_type!r}: Stable Audio 3 converts {', '.join(MODEL_TYPES)}")
    sample_rate = int(_get(reference, "sample_rate", where))
    model = _get(reference, "model", where)
    if model_type == "autoencoder" or "encoder" in model:
        return autoencoder_config(same_section(model, sample_rate, f"{where}.model"),
                                  int(reference.get("sample_size", 0))), None
    pretransform = _get(model, "pretransform", f"{where}.model")
    _check_known(pretransform, {"type", "config", "chunked", "iterate_batch"}, f"{where}.model.pretransform")
    section = same_section(_get(pretransform, "config", f"{where}.model.pretransform"), sample_rate,
                           f"{where}.model.pretransform.config")
    return autoencoder_config(section, 0), diffusion_config(
        reference, autoencoder_checkpoint=autoencoder_checkpoint, t5gemma_path=t5gemma_path,
        compute_dtype=compute_dtype, where=where)


def reference_model_config(diffusion: Mapping[str, Any] | None, autoencoder: Mapping[str, Any],
                           sample_size: int = 0) -> dict[str, Any]:
    """A Stable Audio 3 model_config.json for a diffusion config with its autoencoder section, or (diffusion None)
    for the autoencoder alone, as the AE-only SAME repos have it."""
    ae_block = reference_same(autoencoder)
    top = dict(sample_rate=int(autoencoder["sample_rate"]))
    if diffusion is None:
        return dict(model_type="autoencoder", sample_size=int(sample_size), **top, model=ae_block)
    model, conditioner = diffusion["model"], diffusion["conditioner"]
    configs = []
    for entry in _plain(conditioner["conditioning"]["configs"]):
        options = entry["config"]
        if entry["type"] == "t5gemma":
            options = dict(model_name=options.get("t5gemma_model_name", T5GEMMA_MODEL),
                           max_length=int(options["max_length"]), padding_mode=options.get("padding_mode", "zero"))
        elif entry["type"] != "number":
            raise ConfigError(f"config.conditioner: '{entry['id']}' has type {entry['type']!r}; Stable Audio 3 has "
                              f"t5gemma and number conditioners")
        configs.append(dict(id=entry["id"], type=entry["type"], config=options))
    diffusion_block = dict(
        diffusion_objective=diffusion["objective"]["name"], config=reference_dit(model),
        cross_attention_cond_ids=list(conditioner["cross_attention_cond_ids"]),
        global_cond_ids=list(conditioner["global_cond_ids"]),
        local_add_cond_ids=INPAINT_IDS if int(model["local_cond_dim"]) else [],
        mask_padding_attention=bool(diffusion["objective"]["mask_padding"]))
    shift = reference_shift(diffusion["objective"]["time_shift"])
    if shift is not None:
        diffusion_block["distribution_shift_options"] = shift
    return dict(model_type="diffusion_cond", sample_size=int(diffusion["data"]["latent_length"])
                * ae_block["downsampling_ratio"], **top,
                model=dict(io_channels=int(model["io_channels"]),
                           pretransform=dict(chunked=False, iterate_batch=False, config=ae_block),
                           conditioning=dict(configs=configs, cond_dim=int(conditioner["conditioning"]["cond_dim"])),
                           diffusion=diffusion_block))


__all__ = ["autoencoder_config", "dit_section", "import_configs", "reference_dit", "reference_model_config",
           "reference_same", "same_section", "sampling_time_shift", "shift_section"]

"""stable-audio-tools `model_config.json` <-> musicdiff configs (spec §8, §1.1, §2.1, §5).

Import reads the reference JSON (`model_type` "diffusion_cond" or "autoencoder") into full musicdiff configs built
from the repo presets, so the converted checkpoints carry configs every CLI accepts:
- autoencoder: `configs/autoencoder.py:sao` with the `autoencoder` section taken from the Oobleck pretransform
  (encoder, decoder, bottleneck), `data.sample_size` = the reference `sample_size`;
- diffusion: `configs/diffusion.py:sao` (v objective) or `:sao_small` (rectified flow) with `model` from the DiT
  config, `conditioner` = the reference `conditioning` block plus its routing (cross_attention_cond_ids,
  global_cond_ids), `prompt_encoder` for the t5 conditioner (its weights load separately from a local Hugging Face
  directory, as the reference does), `objective.name` = diffusion_objective, `data.latent_length` =
  sample_size / downsampling_ratio and `data.cond_tokens` = the cross-attention sequence length. The reference's
  AdamW + InverseLR recipe, when present, sets `training`.
The DiT gets `use_cross_attn_mask=False`: the reference DiT drops the cross-attention mask (padded T5 tokens are
zero vectors that still take softmax mass), and only that reproduces its outputs.

Every reference option is either translated or refused with a ConfigError naming it: an option whose effect the
musicdiff models do not implement (adaLN, patching, memory tokens, anti-aliased activations, pretransform scale,
distribution shift, ...) is never dropped silently. Export is the inverse (`reference_model_config`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from musicdiff.config import load_config
from musicdiff.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_TYPES = ("diffusion_cond", "autoencoder")
OBJECTIVES = ("v", "rectified_flow", "rf_denoiser")
CONDITIONER_TYPES = ("number", "t5")
T5_DEFAULT_MAX_LENGTH = 128  # T5Conditioner's default
REFERENCE_ROTARY_MIN_DIM = 32  # ContinuousTransformer: RotaryEmbedding(max(dim_heads // 2, 32))
REFERENCE_ROTARY_BASE = 10000.0
REFERENCE_TIMESTEP_FEATURES = 256

# Reference constructor defaults (stable-audio-tools 0.0.19) for the options a config may leave out.
ENCODER_DEFAULTS = dict(in_channels=2, channels=128, latent_dim=32, c_mults=[1, 2, 4, 8], strides=[2, 4, 8, 8],
                        use_snake=False, antialias_activation=False)
DECODER_DEFAULTS = dict(out_channels=2, channels=128, latent_dim=32, c_mults=[1, 2, 4, 8], strides=[2, 4, 8, 8],
                        use_snake=False, antialias_activation=False, use_nearest_upsample=False, final_tanh=True)
# DiT options: value the musicdiff DiT implements (None: translated below, any value accepted).
DIT_FIXED = dict(patch_size=1, input_concat_dim=0, prepend_cond_dim=0, global_cond_type="prepend",
                 timestep_cond_type="global", transformer_type="continuous_transformer", rotary_pos_emb=True,
                 conformer=False, use_sinusoidal_emb=False, use_abs_pos_emb=False, num_memory_tokens=0,
                 sliding_window=None, final_cross_attn_ix=-1, causal=False, layer_scale=False, remove_norms=False,
                 add_rope=False)
DIT_TRANSLATED = ("io_channels", "embed_dim", "depth", "num_heads", "cond_token_dim", "global_cond_dim",
                  "project_cond_tokens", "project_global_cond", "attn_kwargs", "ff_kwargs", "norm_kwargs",
                  "zero_init_branch_outputs", "timestep_embed_dim", "abs_pos_emb_max_length")
ATTN_FIXED = dict(differential=False, feat_scale=False, causal=False)
FF_FIXED = dict(no_bias=False, glu=True, use_conv=False)
NORM_FIXED = dict(bias=False, fix_scale=False)


def _get(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: '{key}' is missing; a stable-audio-tools model_config.json needs it")
    return mapping[key]


def _check_fixed(values: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for key, expected in fixed.items():
        if key in values and values[key] != expected:
            raise ConfigError(f"{where}.{key}={values[key]!r}: musicdiff implements only {expected!r}; this model "
                              f"cannot be converted")


def _check_known(values: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unsupported option(s) {unknown}; musicdiff cannot reproduce them")


def _plain(value: Any) -> Any:
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def preset(file: str, name: str) -> ml_collections.ConfigDict:
    """A repo preset, unlocked for editing."""
    path = CONFIGS_DIR / file
    if not path.is_file():
        raise ConfigError(f"{path}: the musicdiff config presets are missing; run the converter from a checkout")
    config = load_config(f"{path}:{name}")
    config.unlock()
    return config


# ---- autoencoder ---------------------------------------------------------------------------------------------

def autoencoder_section(ae: Mapping[str, Any], sample_rate: int, where: str) -> dict[str, Any]:
    """Our `autoencoder` section from a reference autoencoder `model` block (spec §1.1)."""
    _check_known(ae, {"encoder", "decoder", "bottleneck", "latent_dim", "downsampling_ratio", "io_channels",
                      "in_channels", "out_channels"}, where)
    encoder, decoder = _get(ae, "encoder", where), _get(ae, "decoder", where)
    for part, name in ((encoder, "encoder"), (decoder, "decoder")):
        if part.get("type") != "oobleck":
            raise ConfigError(f"{where}.{name}.type={part.get('type')!r}: only 'oobleck' converts")
    _check_known(encoder, {"type", "config", "requires_grad"}, f"{where}.encoder")
    _check_known(decoder, {"type", "config", "requires_grad", "soft_clip"}, f"{where}.decoder")
    if decoder.get("soft_clip", False):
        raise ConfigError(f"{where}.decoder.soft_clip=True: not implemented; this model cannot be converted")
    enc = {**ENCODER_DEFAULTS, **encoder.get("config", {})}
    dec = {**DECODER_DEFAULTS, **decoder.get("config", {})}
    _check_known(enc, set(ENCODER_DEFAULTS), f"{where}.encoder.config")
    _check_known(dec, set(DECODER_DEFAULTS), f"{where}.decoder.config")
    for key in ("antialias_activation", "use_nearest_upsample"):
        for part, name in ((enc, "encoder"), (dec, "decoder")):
            if part.get(key, False):
                raise ConfigError(f"{where}.{name}.config.{key}=True: not implemented; this model cannot be converted")
    for key in ("channels", "c_mults", "strides", "use_snake"):
        if enc[key] != dec[key]:
            raise ConfigError(f"{where}: encoder {key}={enc[key]!r} differs from decoder {key}={dec[key]!r}; "
                              f"musicdiff's Oobleck shares them")
    bottleneck = ae.get("bottleneck") or {"type": "none"}
    kind = bottleneck.get("type")
    if kind not in ("vae", "none"):
        raise ConfigError(f"{where}.bottleneck.type={kind!r}: only 'vae' (or no bottleneck) converts")
    _check_known(bottleneck, {"type"}, f"{where}.bottleneck")
    latent_dim = int(_get(ae, "latent_dim", where))
    expected_encoder_out = 2 * latent_dim if kind == "vae" else latent_dim
    if enc["latent_dim"] != expected_encoder_out or dec["latent_dim"] != latent_dim:
        raise ConfigError(f"{where}: encoder latent_dim {enc['latent_dim']} / decoder latent_dim {dec['latent_dim']} "
                          f"do not fit a '{kind}' bottleneck of latent_dim {latent_dim}")
    ratio = math.prod(enc["strides"])
    if int(_get(ae, "downsampling_ratio", where)) != ratio:
        raise ConfigError(f"{where}.downsampling_ratio={ae['downsampling_ratio']}: the strides {enc['strides']} give "
                          f"{ratio}")
    io_channels = int(_get(ae, "io_channels", where))
    in_channels = int(ae.get("in_channels") or io_channels)
    out_channels = int(ae.get("out_channels") or io_channels)
    if enc["in_channels"] != in_channels or dec["out_channels"] != out_channels:
        raise ConfigError(f"{where}: encoder in_channels {enc['in_channels']} / decoder out_channels "
                          f"{dec['out_channels']} disagree with io_channels {io_channels}")
    return dict(sample_rate=int(sample_rate), in_channels=in_channels, out_channels=out_channels,
                channels=int(enc["channels"]), c_mults=tuple(enc["c_mults"]), strides=tuple(enc["strides"]),
                latent_dim=latent_dim, use_snake=bool(enc["use_snake"]), antialias=False,
                final_tanh=bool(dec["final_tanh"]), bottleneck_type=kind)


def autoencoder_config(section: Mapping[str, Any], sample_size: int) -> ml_collections.ConfigDict:
    """A full autoencoder training config (configs/autoencoder.py:sao) around a converted section."""
    config = preset("autoencoder.py", "sao")
    values = dict(section)
    config.autoencoder.bottleneck.type = values.pop("bottleneck_type")
    for key, value in values.items():
        config.autoencoder[key] = value
    config.data.sample_rate = section["sample_rate"]
    ratio = math.prod(section["strides"])
    if sample_size and sample_size % ratio == 0:
        config.data.sample_size = int(sample_size)
    elif config.data.sample_size % ratio:
        config.data.sample_size = ratio * max(1, config.data.sample_size // ratio)
    config.lock()
    return config


def pretransform_autoencoder(model: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The autoencoder block inside a diffusion model's `pretransform`, refusing what changes its numbers."""
    pretransform = _get(model, "pretransform", where)
    if pretransform.get("type") != "autoencoder":
        raise ConfigError(f"{where}.pretransform.type={pretransform.get('type')!r}: only 'autoencoder' converts")
    _check_known(pretransform, {"type", "config", "scale", "iterate_batch", "chunked", "model_half", "enable_grad"},
                 f"{where}.pretransform")
    if float(pretransform.get("scale", 1.0)) != 1.0:
        raise ConfigError(f"{where}.pretransform.scale={pretransform['scale']}: latent scaling is not implemented; "
                          f"only scale 1.0 converts")
    return _get(pretransform, "config", f"{where}.pretransform")


# ---- DiT -----------------------------------------------------------------------------------------------------

def dit_section(dit: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Our `model` section values from a reference `diffusion.config` (spec §2.1)."""
    _check_known(dit, set(DIT_FIXED) | set(DIT_TRANSLATED), where)
    _check_fixed(dit, DIT_FIXED, where)
    embed_dim = int(_get(dit, "embed_dim", where))
    global_cond_dim = int(dit.get("global_cond_dim", 0))
    if not dit.get("project_global_cond", True) and global_cond_dim not in (0, embed_dim):
        raise ConfigError(f"{where}.project_global_cond=False with global_cond_dim {global_cond_dim} != embed_dim "
                          f"{embed_dim}: the reference cannot prepend that token")
    attn = dict(dit.get("attn_kwargs", {}))
    _check_known(attn, {"qk_norm"} | set(ATTN_FIXED), f"{where}.attn_kwargs")
    _check_fixed(attn, ATTN_FIXED, f"{where}.attn_kwargs")
    qk_norm = attn.get("qk_norm", "none")
    if qk_norm not in ("none", "ln"):
        raise ConfigError(f"{where}.attn_kwargs.qk_norm={qk_norm!r}: musicdiff implements 'none' and 'ln'")
    ff = dict(dit.get("ff_kwargs", {}))
    _check_known(ff, {"mult", "zero_init_output"} | set(FF_FIXED), f"{where}.ff_kwargs")
    _check_fixed(ff, FF_FIXED, f"{where}.ff_kwargs")
    mult = float(ff.get("mult", 4))
    if not mult.is_integer():
        raise ConfigError(f"{where}.ff_kwargs.mult={ff['mult']}: only integer multipliers convert")
    norm = dict(dit.get("norm_kwargs", {}))
    _check_known(norm, {"eps", "force_fp32"} | set(NORM_FIXED), f"{where}.norm_kwargs")
    _check_fixed(norm, NORM_FIXED, f"{where}.norm_kwargs")
    return dict(io_channels=int(_get(dit, "io_channels", where)), embed_dim=embed_dim,
                depth=int(_get(dit, "depth", where)), num_heads=int(_get(dit, "num_heads", where)),
                cond_token_dim=int(dit.get("cond_token_dim", 0)), global_cond_dim=global_cond_dim,
                project_cond_tokens=bool(dit.get("project_cond_tokens", True)), block_type="sao",
                transformer_type="continuous_transformer", timestep_features_dim=REFERENCE_TIMESTEP_FEATURES,
                ff_mult=int(mult), rotary_min_dim=REFERENCE_ROTARY_MIN_DIM, rotary_base=REFERENCE_ROTARY_BASE,
                layer_norm_eps=float(norm.get("eps", 1e-5)), use_cross_attn_mask=False, qk_norm=qk_norm)


def conditioner_section(model: Mapping[str, Any], diffusion: Mapping[str, Any], where: str) -> dict[str, Any]:
    conditioning = copy.deepcopy(dict(_get(model, "conditioning", where)))
    _check_known(conditioning, {"configs", "cond_dim", "default_keys", "pre_encoded_keys"}, f"{where}.conditioning")
    if conditioning.get("pre_encoded_keys"):
        raise ConfigError(f"{where}.conditioning.pre_encoded_keys: not supported; encode these conditions with a "
                          f"conditioner")
    conditioning.pop("pre_encoded_keys", None)
    for entry in _get(conditioning, "configs", f"{where}.conditioning"):
        kind = entry.get("type")
        if kind not in CONDITIONER_TYPES:
            raise ConfigError(f"{where}.conditioning: '{entry.get('id')}' has type {kind!r}; musicdiff converts "
                              f"{', '.join(CONDITIONER_TYPES)}")
        options = entry.setdefault("config", {})
        if kind == "t5" and options.get("enable_grad", False):
            raise ConfigError(f"{where}.conditioning: '{entry['id']}' fine-tunes T5 (enable_grad); musicdiff keeps T5 "
                              f"frozen outside the checkpoint")
        known = {"output_dim", "min_val", "max_val"} if kind == "number" else {
            "output_dim", "t5_model_name", "max_length", "enable_grad", "project_out"}
        _check_known(options, known, f"{where}.conditioning.{entry['id']}")
    for key in ("input_concat_ids", "prepend_cond_ids"):
        if diffusion.get(key):
            raise ConfigError(f"{where}.diffusion.{key}: not supported by the musicdiff DiT")
    return dict(name="multi_conditioner", conditioning=conditioning,
                cross_attention_cond_ids=tuple(diffusion.get("cross_attention_cond_ids", ())),
                global_cond_ids=tuple(diffusion.get("global_cond_ids", ())))


def cond_token_count(conditioner: Mapping[str, Any]) -> int:
    """Length of the cross-attention sequence: max_length per t5 condition, one token per number."""
    entries = {e["id"]: e for e in conditioner["conditioning"]["configs"]}
    total = 0
    for cond_id in conditioner["cross_attention_cond_ids"]:
        entry = entries[cond_id]
        total += int(entry["config"].get("max_length", T5_DEFAULT_MAX_LENGTH)) if entry["type"] == "t5" else 1
    return total


def _training_from_reference(config: ml_collections.ConfigDict, training: Mapping[str, Any]) -> None:
    """AdamW + InverseLR of the reference's `training.optimizer_configs.diffusion`, when it has them."""
    diffusion = training.get("optimizer_configs", {}).get("diffusion", {})
    optimizer, scheduler = diffusion.get("optimizer", {}), diffusion.get("scheduler", {})
    if optimizer.get("type") == "AdamW":
        values = optimizer.get("config", {})
        config.training.learning_rate = float(values.get("lr", config.training.learning_rate))
        betas = values.get("betas", (config.training.b1, config.training.b2))
        config.training.b1, config.training.b2 = float(betas[0]), float(betas[1])
        config.training.weight_decay = float(values.get("weight_decay", config.training.weight_decay))
        config.training.eps = float(values.get("eps", config.training.eps))
    if scheduler.get("type") == "InverseLR":
        values = scheduler.get("config", {})
        config.training.lr_schedule = "inverse"
        config.training.lr_inv_gamma = float(values.get("inv_gamma", config.training.lr_inv_gamma))
        config.training.lr_power = float(values.get("power", config.training.lr_power))
        config.training.lr_warmup = float(values.get("warmup", config.training.lr_warmup))
    if "cfg_dropout_prob" in training:
        config.training.cfg_dropout_prob = float(training["cfg_dropout_prob"])


def diffusion_config(reference: Mapping[str, Any], *, autoencoder_checkpoint: str, t5_path: str | None = None,
                     compute_dtype: str = "float32", where: str = "model_config.json") -> ml_collections.ConfigDict:
    """A full diffusion config from a reference `diffusion_cond` config."""
    model = _get(reference, "model", where)
    diffusion = _get(model, "diffusion", f"{where}.model")
    if diffusion.get("type") != "dit":
        raise ConfigError(f"{where}.model.diffusion.type={diffusion.get('type')!r}: only 'dit' converts")
    _check_known(diffusion, {"type", "config", "diffusion_objective", "cross_attention_cond_ids", "global_cond_ids",
                             "input_concat_ids", "prepend_cond_ids"}, f"{where}.model.diffusion")
    objective = diffusion.get("diffusion_objective", "v")
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}.model.diffusion.diffusion_objective={objective!r}: expected one of "
                          f"{', '.join(OBJECTIVES)}")
    config = preset("diffusion.py", "sao" if objective == "v" else "sao_small")
    config.model.update(dit_section(_get(diffusion, "config", f"{where}.model.diffusion"),
                                    f"{where}.model.diffusion.config"))
    config.model.dtype = compute_dtype
    config.model.param_dtype = "float32"
    # The checkpoint's config is what generation rebuilds the DiT from; recomputation only pays off in training,
    # whose config (e.g. configs/diffusion.py:sao with --config.init_from) sets its own remat.
    config.model.remat = "none"
    io_channels = int(model.get("io_channels", config.model.io_channels))
    if io_channels != config.model.io_channels:
        raise ConfigError(f"{where}.model.io_channels={io_channels} differs from the DiT's {config.model.io_channels}")
    conditioner = conditioner_section(model, diffusion, f"{where}.model")
    config.conditioner = ml_collections.ConfigDict(conditioner)
    text = [e for e in conditioner["conditioning"]["configs"] if e["type"] == "t5"]
    if len(text) > 1:
        raise ConfigError(f"{where}.model.conditioning: {len(text)} t5 conditioners; musicdiff has one prompt encoder")
    if text:
        options = text[0]["config"]
        config.prompt_encoder.path = t5_path or options.get("t5_model_name", "t5-base")
        config.prompt_encoder.max_length = int(options.get("max_length", T5_DEFAULT_MAX_LENGTH))
    else:
        config.prompt_encoder = ml_collections.ConfigDict(dict(name="none"))
    config.objective.name = objective
    ratio = int(_get(pretransform_autoencoder(model, f"{where}.model"), "downsampling_ratio", where))
    sample_size = int(_get(reference, "sample_size", where))
    if sample_size % ratio:
        raise ConfigError(f"{where}.sample_size={sample_size}: not a multiple of the downsampling ratio {ratio}")
    config.data.latent_length = sample_size // ratio
    config.data.cond_tokens = cond_token_count(conditioner)
    config.data.sample_rate = int(_get(reference, "sample_rate", where))
    config.autoencoder_checkpoint = autoencoder_checkpoint
    _training_from_reference(config, reference.get("training", {}))
    config.lock()
    return config


def import_configs(reference: Mapping[str, Any], *, autoencoder_checkpoint: str, t5_path: str | None = None,
                   compute_dtype: str = "float32", where: str = "model_config.json"
                   ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict | None]:
    """(autoencoder config, diffusion config or None for an autoencoder-only model_config)."""
    model_type = _get(reference, "model_type", where)
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{where}.model_type={model_type!r}: musicdiff converts {', '.join(MODEL_TYPES)}")
    sample_rate = int(_get(reference, "sample_rate", where))
    sample_size = int(reference.get("sample_size", 0))
    model = _get(reference, "model", where)
    if model_type == "autoencoder":
        section = autoencoder_section(model, sample_rate, f"{where}.model")
        return autoencoder_config(section, sample_size), None
    section = autoencoder_section(pretransform_autoencoder(model, f"{where}.model"), sample_rate,
                                  f"{where}.model.pretransform.config")
    # The autoencoder training config crops like the reference AE recipe, not the diffusion window.
    autoencoder = autoencoder_config(section, 0)
    return autoencoder, diffusion_config(reference, autoencoder_checkpoint=autoencoder_checkpoint, t5_path=t5_path,
                                         compute_dtype=compute_dtype, where=where)


# ---- export --------------------------------------------------------------------------------------------------

def reference_autoencoder(section: Mapping[str, Any]) -> dict[str, Any]:
    """The reference autoencoder `model` block of our `autoencoder` section."""
    if section.get("name") != "oobleck":
        raise ConfigError(f"config.autoencoder.name={section.get('name')!r}: only oobleck exports")
    kind = section["bottleneck"]["type"]
    if kind not in ("vae", "none"):
        raise ConfigError(f"config.autoencoder.bottleneck.type={kind!r}: stable-audio-tools has no equivalent of "
                          f"musicdiff's VQ bottlenecks; only vae and none export")
    if section.get("antialias", False):
        raise ConfigError("config.autoencoder.antialias=True: not exportable")
    if section.get("decoder_upsample", "transpose") != "transpose":
        raise ConfigError(f"config.autoencoder.decoder_upsample={section['decoder_upsample']!r}: only 'transpose' "
                          f"exports (the converter maps SAO's transposed-conv keys)")
    shared = dict(channels=int(section["channels"]), c_mults=list(section["c_mults"]),
                  strides=list(section["strides"]), use_snake=bool(section["use_snake"]))
    latent_dim = int(section["latent_dim"])
    block = dict(
        encoder=dict(type="oobleck", config=dict(in_channels=int(section["in_channels"]), **shared,
                                                 latent_dim=2 * latent_dim if kind == "vae" else latent_dim)),
        decoder=dict(type="oobleck", config=dict(out_channels=int(section["out_channels"]), **shared,
                                                 latent_dim=latent_dim, final_tanh=bool(section["final_tanh"]))),
        latent_dim=latent_dim, downsampling_ratio=math.prod(section["strides"]),
        io_channels=int(section["in_channels"]))
    if int(section["out_channels"]) != int(section["in_channels"]):
        block["out_channels"] = int(section["out_channels"])
    if kind == "vae":
        block["bottleneck"] = dict(type="vae")
    return block


def reference_dit(model: Mapping[str, Any]) -> dict[str, Any]:
    checks = dict(block_type="sao", transformer_type="continuous_transformer",
                  timestep_features_dim=REFERENCE_TIMESTEP_FEATURES, rotary_min_dim=REFERENCE_ROTARY_MIN_DIM,
                  rotary_base=REFERENCE_ROTARY_BASE,
                  # Stable Audio 3's options (convert/sa3_dit_keys.py maps those weights, not this SAO exporter).
                  norm_type="layer_norm", num_memory_tokens=0, differential_attention=False,
                  timestep_features_type="learned", timestep_features_logsnr=False)
    for key, expected in checks.items():
        if model.get(key, expected) != expected:
            raise ConfigError(f"config.model.{key}={model[key]!r}: stable-audio-tools' DiT fixes it to {expected!r}; "
                              f"this model does not export")
    dit = dict(io_channels=int(model["io_channels"]), embed_dim=int(model["embed_dim"]), depth=int(model["depth"]),
               num_heads=int(model["num_heads"]), cond_token_dim=int(model["cond_token_dim"]),
               global_cond_dim=int(model["global_cond_dim"]), project_cond_tokens=bool(model["project_cond_tokens"]),
               transformer_type="continuous_transformer")
    if model.get("qk_norm", "none") != "none":
        dit["attn_kwargs"] = dict(qk_norm=model["qk_norm"])
    if int(model.get("ff_mult", 4)) != 4:
        dit["ff_kwargs"] = dict(mult=int(model["ff_mult"]))
    if float(model.get("layer_norm_eps", 1e-5)) != 1e-5:
        dit["norm_kwargs"] = dict(eps=float(model["layer_norm_eps"]))
    return dit


def reference_conditioning(conditioner: Mapping[str, Any]) -> dict[str, Any]:
    conditioning = _plain(conditioner["conditioning"])
    for entry in conditioning["configs"]:
        if entry["type"] not in CONDITIONER_TYPES:
            raise ConfigError(f"config.conditioner: '{entry['id']}' has type {entry['type']!r}, which "
                              f"stable-audio-tools lacks; only {', '.join(CONDITIONER_TYPES)} export")
    return conditioning


def reference_model_config(diffusion: Mapping[str, Any] | None, autoencoder: Mapping[str, Any],
                           autoencoder_sample_size: int = 0) -> dict[str, Any]:
    """A stable-audio-tools model_config.json for a diffusion config (with its autoencoder section) or, when
    `diffusion` is None, for the autoencoder alone."""
    ae_block = reference_autoencoder(autoencoder)
    top = dict(sample_rate=int(autoencoder["sample_rate"]), audio_channels=int(autoencoder["in_channels"]))
    if diffusion is None:
        return dict(model_type="autoencoder", sample_size=int(autoencoder_sample_size), **top, model=ae_block)
    objective = diffusion["objective"]["name"]
    if objective not in OBJECTIVES:
        raise ConfigError(f"config.objective.name={objective!r}: stable-audio-tools has no such diffusion_objective")
    model, conditioner = diffusion["model"], diffusion["conditioner"]
    diffusion_block = dict(type="dit", cross_attention_cond_ids=list(conditioner["cross_attention_cond_ids"]),
                           global_cond_ids=list(conditioner["global_cond_ids"]), config=reference_dit(model))
    if objective != "v":
        diffusion_block["diffusion_objective"] = objective
    training = diffusion["training"]
    reference_training = dict(
        use_ema=True, cfg_dropout_prob=float(training["cfg_dropout_prob"]),
        optimizer_configs=dict(diffusion=dict(
            optimizer=dict(type="AdamW", config=dict(lr=float(training["learning_rate"]),
                                                     betas=[float(training["b1"]), float(training["b2"])],
                                                     weight_decay=float(training["weight_decay"]))),
            scheduler=dict(type="InverseLR", config=dict(inv_gamma=float(training["lr_inv_gamma"]),
                                                         power=float(training["lr_power"]),
                                                         warmup=float(training["lr_warmup"]))))))
    return dict(
        model_type="diffusion_cond",
        sample_size=int(diffusion["data"]["latent_length"]) * ae_block["downsampling_ratio"], **top,
        model=dict(pretransform=dict(type="autoencoder", iterate_batch=True, config=ae_block),
                   conditioning=reference_conditioning(conditioner), diffusion=diffusion_block,
                   io_channels=int(model["io_channels"])),
        training=reference_training)

"""Import Stable Audio (stable-audio-tools) checkpoints into musicdiff, and export musicdiff checkpoints back.

    import_stable_audio("model_config.json", "model.safetensors", "OUT")
        -> OUT/autoencoder   state params/autoencoder, config = an autoencoder training config
           OUT/diffusion     state params/model + params/conditioner, config = a diffusion config whose
                             autoencoder_checkpoint is OUT/autoencoder            (diffusion_cond models only)
    export_stable_audio("EXPORT", diffusion="OUT/diffusion")  -> EXPORT/model.safetensors + EXPORT/model_config.json

Both directories are ordinary musicdiff checkpoints (`WORKDIR/checkpoints/0/{state,config}`), read by
`musicdiff.checkpoints.load_model` and by `--config.init_from` for fine-tuning. T5 is not part of a Stable
Audio checkpoint: the diffusion config's `prompt_encoder.path` names the Hugging Face T5 directory (default the
reference's `t5_model_name`, e.g. "t5-base"), loaded separately at generation time as the reference does.

Checkpoints are `model.safetensors` or a `.ckpt` state dict; a `.ckpt` is read only with
`torch.load(weights_only=True)`, so nothing is ever unpickled. Before anything is written, every key of the file is
matched against the rules of stable_audio_keys.py: missing keys, unknown keys and shape mismatches are refused with
their names and the file. Configs are translated (and unsupported options refused) by stable_audio_config.py.

Half-precision files (float16 or bfloat16 exports) import like float32 ones: every tensor is cast to the model's
parameter dtype (exactly: each half-precision value is a float32 value), and the fixed buffers (rotary `inv_freq`,
LayerNorm `beta`) are compared with their recomputed values rounded to the stored dtype, within one step of it. A
tensor holding NaN or inf is refused by name (musicdiff.weight_files.checked_cast).

Reference behaviours kept for numerical parity (spec §10): the converted DiT ignores the cross-attention mask
(`use_cross_attn_mask=False`), classifier-free guidance uses all-zero cross tokens with the global timing embedding
kept (`conditioning.null_condition` with `parameterization.cfg_denoiser`), and the reference VAE always samples when
encoding: `OobleckAutoencoder.encode(..., sample=True)` does the same, `sample=False` returns the mean.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from musicdiff.convert.same_keys import same_rules
from musicdiff.convert.stable_audio_config import import_configs, reference_model_config
from musicdiff.convert.stable_audio_keys import (
    CONDITIONER_PREFIX,
    DIT_PREFIX,
    PRETRANSFORM_PREFIX,
    TensorRule,
    conditioner_rules,
    dit_rules,
    oobleck_rules,
    prefixed,
)
from musicdiff.errors import ConfigError, DataError
from musicdiff.files import atomic_path, atomic_write_text
from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.models import registry
from musicdiff.checkpoints import Checkpointer
from musicdiff.checkpoints import CHECKPOINT_DIR
from musicdiff.weight_files import checked_cast, rounding_step

MAX_LISTED = 12
CHECKPOINT_STEP = 0
AUTOENCODER_DIR, DIFFUSION_DIR = "autoencoder", "diffusion"
BUFFER_RTOL, BUFFER_ATOL = 1e-6, 1e-6


# ---- reading reference checkpoints -------------------------------------------------------------------------------

class TensorSource:
    """Named tensors read one at a time. `name` is what error messages call the file."""

    name: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        """The tensor as stored (float16 and bfloat16 included)."""
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        """The tensor as float32, refused if any value is not finite."""
        return checked_cast(self.read(key), np.float32, file=self.name, key=key)


class ArraySource(TensorSource):
    """An in-memory state dict {key: array}."""

    def __init__(self, arrays: Mapping[str, Any], name: str = "state dict"):
        self.arrays, self.name = dict(arrays), name

    def keys(self) -> list[str]:
        return list(self.arrays)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self.arrays[key]))

    def read(self, key: str) -> np.ndarray:
        return np.asarray(self.arrays[key])


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path):
        from safetensors import safe_open

        from musicdiff.models.text_encoder import read_safetensors_header

        self.path, self.name = path, str(path)
        try:
            self.header = read_safetensors_header(path)
            self._handle = safe_open(str(path), framework="numpy")
        except Exception as err:
            raise DataError(f"{path}: not a readable safetensors file ({err})") from None
        self._keys = [key for key in self._handle.keys()]

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        from musicdiff.models.text_encoder import read_safetensors_tensor

        return np.asarray(read_safetensors_tensor(self._handle, self.path, key, self.header))


class TorchCheckpointSource(TensorSource):
    """A `.ckpt`: `torch.load(weights_only=True)`, so only tensors and plain containers are accepted."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise DataError(f"{path}: reading a .ckpt needs PyTorch (pip install torch), or pass model.safetensors") \
                from None
        self.path, self.name = path, str(path)
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise DataError(f"{path}: cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
                            f"{err}); only plain tensor state dicts convert") from None
        state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
        if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
            raise DataError(f"{path}: holds no state dict of tensors (expected {{'state_dict': {{name: tensor}}}})")
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read(self, key: str) -> np.ndarray:
        import torch

        tensor = self.state[key].detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bits viewed as ml_dtypes.bfloat16
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def open_checkpoint(path: str | Path) -> TensorSource:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file; pass model.safetensors or model.ckpt")
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return TorchCheckpointSource(path)
    raise DataError(f"{path}: unknown checkpoint format; pass a .safetensors file or a .ckpt state dict")


def read_model_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such model_config.json") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


# ---- rules for a set of sections ---------------------------------------------------------------------------------

@dataclasses.dataclass
class SectionPlan:
    """One musicdiff config section, its abstract model and the rules of its reference tensors."""

    section: str
    graphdef: Any
    abstract: nnx.State
    rules: list[TensorRule]

    def targets(self) -> dict[tuple[Any, ...], Any]:
        return {tuple(path): var for path, var in nnx.to_flat_state(self.abstract)}


# Per section: the default key prefix inside a diffusion_cond checkpoint, and the tensor rules of each registered
# model that section may hold (Stable Audio 3's SAME autoencoder shares the machinery: stable_audio_3.py).
_RULES: dict[str, tuple[dict[str, Callable[[nnx.Module], list[TensorRule]]], str]] = {
    "autoencoder": ({"oobleck": oobleck_rules, "same": same_rules}, PRETRANSFORM_PREFIX),
    "model": ({"dit": dit_rules}, DIT_PREFIX),
    "conditioner": ({"multi_conditioner": conditioner_rules}, CONDITIONER_PREFIX),
}


def plan_section(section: str, model_config: ml_collections.ConfigDict, prefix: str | None = None) -> SectionPlan:
    """Rules for one section, built from shapes only (no parameter is allocated)."""
    abstract_model = nnx.eval_shape(lambda: registry.build(model_config, nnx.Rngs(0)))
    makers, default_prefix = _RULES[section]
    if model_config.name not in makers:
        raise ConfigError(f"config.{section}.name={model_config.name!r}: no Stable Audio checkpoint layout; known: "
                          f"{', '.join(makers)}")
    make_rules = makers[model_config.name]
    try:
        rules = prefixed(make_rules(abstract_model), default_prefix if prefix is None else prefix)
    except ValueError as err:
        raise ConfigError(f"config.{section}: {err}") from None
    graphdef, abstract = nnx.split(abstract_model, nnx.Param)
    plan = SectionPlan(section, graphdef, abstract, rules)
    covered = {rule.path for rule in rules if rule.path is not None}
    uncovered = sorted(".".join(map(str, p)) for p in set(plan.targets()) - covered)
    if uncovered:
        raise ConfigError(f"config.{section}: parameters without a stable-audio-tools equivalent: "
                          f"{_listing(uncovered)}")
    return plan


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def check_keys(source: TensorSource, plans: Iterable[SectionPlan]) -> None:
    """Refuses a checkpoint whose keys or shapes differ from the rules, listing every difference by kind."""
    rules = {rule.key: rule for plan in plans for rule in plan.rules}
    present = set(source.keys())
    missing, unknown = sorted(set(rules) - present), sorted(present - set(rules))
    wrong = [f"{key} {source.shape(key)} (expected {rules[key].reference_shape})" for key in sorted(present & set(rules))
             if source.shape(key) != rules[key].reference_shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {_listing(unknown)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_listing(wrong)}")
    if problems:
        raise DataError(f"{source.name}: does not match its model config; " + "; ".join(problems)
                        + ". A training checkpoint must be unwrapped first (stable-audio-tools unwrap_model.py)")


def check_buffer(source: TensorSource, rule: TensorRule, stored: np.ndarray) -> None:
    """Refuses a buffer that differs from its fixed value by more than the precision of the dtype it is stored in:
    the fixed value is rounded to that dtype and a stored value may be one rounding step of it away (an export that
    computed the value differently in float32 may round to the neighbouring half-precision value)."""
    step = rounding_step(stored.dtype)
    expected = rule.buffer.astype(stored.dtype).astype(np.float32) if step else rule.buffer
    array = rule.to_ours(checked_cast(stored, np.float32, file=source.name, key=rule.key))
    rtol = max(BUFFER_RTOL, step)
    if not np.allclose(array, expected, rtol=rtol, atol=BUFFER_ATOL):
        raise DataError(f"{source.name}: buffer {rule.key} differs from its fixed value beyond the precision of its "
                        f"dtype {stored.dtype.name} (max deviation {np.max(np.abs(array - expected)):.3g}, tolerance "
                        f"{rtol:.2g} relative + {BUFFER_ATOL:g}); musicdiff cannot represent it")


def iter_converted(source: TensorSource, plan: SectionPlan) -> Iterator[tuple[TensorRule, np.ndarray]]:
    """(rule, musicdiff-layout array in the parameter's dtype) for every parameter of the section, one tensor in
    memory at a time. Buffers are checked against their fixed values (check_buffer) and not yielded."""
    targets = plan.targets()
    for rule in plan.rules:
        if rule.path is None:
            check_buffer(source, rule, source.read(rule.key))
            continue
        array = rule.to_ours(source.get(rule.key))
        target = targets[rule.path].get_value()
        if array.shape != tuple(target.shape):
            raise DataError(f"{source.name}: {rule.key} converts to {array.shape}, the model expects "
                            f"{tuple(target.shape)}")
        yield rule, array.astype(target.dtype, copy=False)


def convert_section(source: TensorSource, plan: SectionPlan) -> nnx.State:
    """The section's parameters (nnx.State of device arrays) from the reference tensors."""
    loaded = {rule.path: jax.device_put(array) for rule, array in iter_converted(source, plan)}
    return nnx.from_flat_state([(path, var.replace(loaded[path])) for path, var in plan.targets().items()])


def export_section(params: nnx.State, plan: SectionPlan) -> dict[str, np.ndarray]:
    """Reference tensors (torch layout, float32) of a section's parameters, buffers included."""
    values = {tuple(path): np.asarray(var.get_value(), np.float32) for path, var in nnx.to_flat_state(params)}
    return {rule.key: rule.buffer.copy() if rule.path is None else rule.to_reference(values[rule.path])
            for rule in plan.rules}


# ---- writing musicdiff checkpoints -------------------------------------------------------------------------------

def _refuse_existing(directory: Path) -> None:
    if (directory / CHECKPOINT_DIR).exists() and any((directory / CHECKPOINT_DIR).iterdir()):
        raise DataError(f"{directory}: already holds a checkpoint; convert into an empty --workdir")


def write_checkpoint(directory: Path, params: Mapping[str, nnx.State], config: ml_collections.ConfigDict) -> Path:
    """`directory/checkpoints/0/{state, config}` with state = {"params": {section: params}} (Orbax, atomic)."""
    with Checkpointer(directory / CHECKPOINT_DIR, save_interval_steps=1, async_save=False) as checkpointer:
        if not checkpointer.save(CHECKPOINT_STEP, {"params": dict(params)}, config=config, force=True):
            raise DataError(f"{directory}: step {CHECKPOINT_STEP} was not written (it exists already)")
    return directory


@dataclasses.dataclass(frozen=True)
class Imported:
    autoencoder: Path
    diffusion: Path | None


def import_stable_audio(model_config: str | Path, checkpoint: str | Path, workdir: str | Path, *,
                        t5_path: str | None = None, compute_dtype: str = "float32") -> Imported:
    """Converts a stable-audio-tools model into OUT/autoencoder (and OUT/diffusion for diffusion_cond models)."""
    return import_checkpoint(model_config, checkpoint, workdir, lambda reference, autoencoder_checkpoint: import_configs(
        reference, autoencoder_checkpoint=autoencoder_checkpoint, t5_path=t5_path, compute_dtype=compute_dtype,
        where=str(model_config)))


ConfigTranslation = Callable[[Mapping[str, Any], str],
                             tuple[ml_collections.ConfigDict, ml_collections.ConfigDict | None]]


def import_checkpoint(model_config: str | Path, checkpoint: str | Path, workdir: str | Path,
                      translate: ConfigTranslation) -> Imported:
    """Any reference format whose model_config `translate(reference, autoencoder_dir)` turns into (autoencoder
    config, diffusion config or None): every key checked first, then OUT/autoencoder (and OUT/diffusion) written."""
    workdir = Path(workdir).resolve()
    reference = read_model_config(model_config)
    ae_dir, diffusion_dir = workdir / AUTOENCODER_DIR, workdir / DIFFUSION_DIR
    ae_config, diffusion_config = translate(reference, str(ae_dir))
    plans = [plan_section("autoencoder", ae_config.autoencoder, PRETRANSFORM_PREFIX if diffusion_config else "")]
    if diffusion_config is not None:
        plans += [plan_section("model", diffusion_config.model), plan_section("conditioner",
                                                                              diffusion_config.conditioner)]
    source = open_checkpoint(checkpoint)
    check_keys(source, plans)
    for directory in (ae_dir, diffusion_dir) if diffusion_config is not None else (ae_dir,):
        _refuse_existing(directory)
    converted = {plan.section: convert_section(source, plan) for plan in plans}
    write_checkpoint(ae_dir, {"autoencoder": converted.pop("autoencoder")}, ae_config)
    if diffusion_config is None:
        return Imported(ae_dir, None)
    write_checkpoint(diffusion_dir, converted, diffusion_config)
    return Imported(ae_dir, diffusion_dir)


# ---- export ------------------------------------------------------------------------------------------------------

def _section_tensors(ref, section: str, prefix: str, use_ema: bool, model_config=None) -> dict[str, np.ndarray]:
    model_config = model_config if model_config is not None else ref.config[section]
    plan = plan_section(section, model_config, prefix)
    module = load_model(ref, section, prefer_ema=use_ema, model_config=model_config)
    return export_section(nnx.state(module, nnx.Param), plan)


@dataclasses.dataclass(frozen=True)
class Exported:
    safetensors: Path
    model_config: Path


def export_stable_audio(workdir: str | Path, *, diffusion: str | Path | None = None,
                        autoencoder: str | Path | None = None, use_ema: bool = True) -> Exported:
    """Writes workdir/model.safetensors + workdir/model_config.json for stable-audio-tools.

    With `diffusion` the result is a diffusion_cond model (DiT, conditioners and the autoencoder named by the
    checkpoint's autoencoder_checkpoint, or by `autoencoder`); with only `autoencoder`, an autoencoder model.
    EMA weights are exported when the checkpoint has them and `use_ema`, as the released SAO files are."""
    def reference_config(diffusion_config, ae_section, ae_config):
        if diffusion_config is None:
            return reference_model_config(None, ae_section, int(ae_config.get("data", {}).get("sample_size", 0)))
        return reference_model_config(diffusion_config, ae_section)

    return export_checkpoint(workdir, reference_config, diffusion=diffusion, autoencoder=autoencoder, use_ema=use_ema)


def export_checkpoint(workdir: str | Path, reference_config: Callable[..., dict[str, Any]], *,
                      diffusion: str | Path | None = None, autoencoder: str | Path | None = None,
                      use_ema: bool = True) -> Exported:
    """Exports musicdiff checkpoints to a reference format whose model_config.json is
    `reference_config(diffusion config dict or None, autoencoder section dict, autoencoder config)`."""
    if diffusion is None and autoencoder is None:
        raise ConfigError("export needs --diffusion=DIR (a diffusion checkpoint) or --autoencoder=DIR")
    diffusion_ref = find_checkpoint(diffusion) if diffusion is not None else None
    if autoencoder is None:
        autoencoder = diffusion_ref.config.get("autoencoder_checkpoint", "")
        if not autoencoder:
            raise ConfigError(f"{diffusion}: config.autoencoder_checkpoint is empty; pass --autoencoder=DIR, the "
                              f"autoencoder whose latents the DiT models")
    ae_ref = find_checkpoint(autoencoder)
    ae_section = ae_ref.config["autoencoder"]
    tensors = _section_tensors(ae_ref, "autoencoder", PRETRANSFORM_PREFIX if diffusion_ref else "", use_ema)
    if diffusion_ref is not None:
        config = diffusion_ref.config
        if int(config.model.io_channels) != int(ae_section.latent_dim):
            raise ConfigError(f"{diffusion}: the DiT has io_channels {config.model.io_channels} but the autoencoder "
                              f"{autoencoder} has latent_dim {ae_section.latent_dim}")
        tensors.update(_section_tensors(diffusion_ref, "model", DIT_PREFIX, use_ema))
        tensors.update(_section_tensors(diffusion_ref, "conditioner", CONDITIONER_PREFIX, use_ema))
        reference = reference_config(config.to_dict(), ae_section.to_dict(), ae_ref.config)
    else:
        reference = reference_config(None, ae_section.to_dict(), ae_ref.config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    weights, config_file = workdir / "model.safetensors", workdir / "model_config.json"
    with atomic_path(weights) as temporary:
        save_file(tensors, str(temporary))
    atomic_write_text(config_file, json.dumps(reference, indent=4) + "\n")
    return Exported(weights, config_file)


__all__ = ["ArraySource", "ConfigTranslation", "Exported", "Imported", "SafetensorsSource", "SectionPlan",
           "TensorSource", "TorchCheckpointSource", "check_buffer", "check_keys", "convert_section", "export_checkpoint",
           "export_section", "export_stable_audio", "import_checkpoint", "import_stable_audio", "iter_converted",
           "open_checkpoint", "plan_section", "read_model_config"]

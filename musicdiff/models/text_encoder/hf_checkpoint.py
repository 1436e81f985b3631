"""Hugging Face checkpoints: directory or hub-name resolution, safetensors reading (bfloat16 included), the loader
that streams an encoder's tensors straight into sharded NNX parameters by a key map, and T5's key map."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from musicdiff.errors import DataError
from musicdiff.models.text_encoder.t5 import T5Encoder, T5EncoderConfig
from musicdiff.parallel import DEFAULT_SHARDING_RULES, make_mesh, mesh_config, param_shardings
from musicdiff.parallel.sharding import Rules
from musicdiff.weight_files import checked_cast

_CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "spiece.model",
                     "special_tokens_map.json"]

# Hugging Face key -> (path in the NNX state, transform of the torch-layout array).
KeyMap = dict[str, tuple[tuple[Any, ...], Callable[[np.ndarray], np.ndarray]]]


def resolve_checkpoint_dir(path_or_name: str | Path) -> Path:
    """A local directory as is; otherwise a Hugging Face hub name, fetched with `snapshot_download` (needs network)."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_name)
    if path.is_absolute() or name.startswith(".") or name.count("/") > 1 or not name:
        raise DataError(f"{name}: no such directory; pass a directory with config.json and model.safetensors")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=_CHECKPOINT_FILES))
    except Exception as err:  # offline, unknown repo, no credentials: one line that names the path
        raise DataError(
            f"{name}: not a local directory and the hub download failed ({type(err).__name__}); download the "
            f"checkpoint (config.json, model.safetensors, tokenizer files) and pass its directory"
        ) from None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / shard for shard in shards]
    else:
        files = [directory / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not (directory / "config.json").is_file():
        absent = missing + ([] if (directory / "config.json").is_file() else [str(directory / "config.json")])
        raise DataError(f"{directory}: checkpoint files missing: {', '.join(absent)}; save the model with "
                        f"save_pretrained(..., safe_serialization=True)")
    return files


def read_safetensors_tensor(handle: Any, file: Path, key: str, header: dict[str, Any] | None) -> np.ndarray:
    """One tensor as numpy; bfloat16 (which numpy lacks) is read raw as uint16 and viewed as ml_dtypes.bfloat16."""
    if handle.get_slice(key).get_dtype() != "BF16":
        return handle.get_tensor(key)
    import ml_dtypes

    entry = header[key]
    start, end = entry["data_offsets"]
    with open(file, "rb") as stream:
        data_start = 8 + int.from_bytes(stream.read(8), "little")
        stream.seek(data_start + start)
        raw = np.frombuffer(stream.read(end - start), dtype="<u2")
    return raw.view(ml_dtypes.bfloat16).reshape(entry["shape"])


def read_safetensors_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        return json.loads(stream.read(size))


def hf_t5_key_map(config: T5EncoderConfig) -> KeyMap:
    """Hugging Face encoder key -> (path in the NNX state, transform of the torch-layout array)."""
    d, h, k = config.d_model, config.num_heads, config.d_kv
    qkv = lambda w: w.T.reshape(d, h, k)  # Linear weight [h*k, d] -> kernel [d, h, k]
    out = lambda w: w.T.reshape(h, k, d)  # Linear weight [d, h*k] -> kernel [h, k, d]
    same = lambda w: w
    keys = {
        "shared.weight": (("shared",), same),
        "encoder.embed_tokens.weight": (("shared",), same),  # tied copy of shared.weight in older files
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (("relative_attention_bias",), same),
        "encoder.final_layer_norm.weight": (("final_layer_norm", "scale"), same),
    }
    ff = {"wi": "wi", "wo": "wo"} if not config.is_gated else {"wi_0": "wi", "wi_1": "wi_gate", "wo": "wo"}
    for i in range(config.num_layers):
        prefix = f"encoder.block.{i}.layer"
        for hf, ours, fn in (("q", "query", qkv), ("k", "key", qkv), ("v", "value", qkv), ("o", "out", out)):
            keys[f"{prefix}.0.SelfAttention.{hf}.weight"] = (("blocks", i, "attention", ours), fn)
        keys[f"{prefix}.0.layer_norm.weight"] = (("blocks", i, "attention_norm", "scale"), same)
        keys[f"{prefix}.1.layer_norm.weight"] = (("blocks", i, "ff_norm", "scale"), same)
        for hf, ours in ff.items():
            keys[f"{prefix}.1.DenseReluDense.{hf}.weight"] = (("blocks", i, "ff", ours), lambda w: w.T)
    return keys


def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, once its files are all there (else one error naming each missing)."""
    _safetensors_files(directory)
    return json.loads((directory / "config.json").read_text())


def _ignored_t5_key(key: str) -> bool:
    # Full T5 checkpoints carry a decoder and an LM head; an encoder-only load drops them.
    return key.startswith(("decoder.", "lm_head."))


def load_hf_encoder(directory: Path, build: Callable[[], nnx.Module], key_map: Callable[[set[str]], KeyMap],
                    ignored: Callable[[str], bool], *, mesh: Mesh | None = None,
                    rules: Rules = DEFAULT_SHARDING_RULES) -> nnx.Module:
    """The module `build` makes, its parameters read from the safetensors files of `directory` and placed on `mesh`
    by the logical-axis rules. `key_map` gets the checkpoint's keys (less the `ignored` ones: a decoder, an LM head)
    and says where each goes. Tensors stream one at a time from safetensors straight to their target sharding; no
    full host copy of the model and no random init happen. Missing tensors, unexpected keys, wrong shapes and
    tensors holding NaN or inf are refused with their names and files."""
    from safetensors import safe_open

    files = _safetensors_files(directory)
    mesh = mesh if mesh is not None else make_mesh(mesh_config())
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    targets = dict(nnx.to_flat_state(abstract_state))
    shardings = {path: var.get_value() for path, var in nnx.to_flat_state(param_shardings(abstract_state, rules, mesh))}

    file_keys = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            file_keys[file] = [key for key in handle.keys() if not ignored(key)]
    present = {key for keys in file_keys.values() for key in keys}
    keys = key_map(present)
    unexpected = sorted(present - set(keys))
    covered = {keys[key][0] for key in present if key in keys}
    expected_key = {}
    for key, (path, _) in keys.items():
        expected_key.setdefault(path, key)  # the first key naming a parameter (its tied copies come later)
    missing = sorted(f"{expected_key.get(p, '?')} (parameter {'.'.join(map(str, p))})" for p in set(targets) - covered)
    if unexpected or missing:
        raise DataError(
            f"{directory}: checkpoint does not match its config.json; missing tensors (in "
            f"{', '.join(f.name for f in files)}): {missing or 'none'}; unexpected keys: {unexpected or 'none'}"
        )

    loaded: dict[tuple[Any, ...], jax.Array] = {}
    for file, names in file_keys.items():
        header = read_safetensors_header(file)
        with safe_open(str(file), framework="numpy") as handle:
            for key in names:
                path, transform = keys[key]
                if path in loaded:  # a tied embedding copy
                    continue
                target = targets[path].get_value()
                stored = read_safetensors_tensor(handle, file, key, header)
                array = np.asarray(transform(checked_cast(stored, target.dtype, file=str(file), key=key)))
                if array.shape != target.shape:
                    raise DataError(f"{file}: {key} has shape {array.shape} after conversion, the model expects "
                                    f"{target.shape}; check config.json")
                loaded[path] = jax.device_put(array, shardings[path])
    state = nnx.from_flat_state([(path, var.replace(loaded[path])) for path, var in targets.items()])
    return nnx.merge(graphdef, state)


def load_t5_encoder(path_or_name: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_SHARDING_RULES,
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> T5Encoder:
    """The T5 encoder of a Hugging Face T5 directory (or hub name), loaded by `load_hf_encoder`."""
    directory = resolve_checkpoint_dir(path_or_name)
    config = T5EncoderConfig.from_mapping(read_hf_config(directory))
    return load_hf_encoder(directory, lambda: T5Encoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
                           lambda present: hf_t5_key_map(config), _ignored_t5_key, mesh=mesh, rules=rules)

"""T5 text encoder in Flax NNX, Hugging Face checkpoint loading into sharded params, tokenizers and caption caching.

The encoder follows Hugging Face's `T5EncoderModel` (spec §5.2): token embedding (`shared`), per layer RMSNorm ->
self-attention -> residual, RMSNorm -> feed-forward -> residual, then a final RMSNorm. T5 specifics:
- attention logits are not scaled by 1/sqrt(d_kv) (T5 folds that into the query init);
- one learned relative-position bias (bidirectional buckets) lives in layer 0 and is reused by every later layer;
  here it is a top-level parameter `relative_attention_bias` [num_buckets, heads];
- RMSNorm has no mean subtraction and no bias; variance, softmax and norms run in float32 whatever the compute dtype;
- feed-forward is ReLU (`wi`, `wo`; t5-base) or gated (`wi_0` activation x `wi_1`; v1.1 "gated-gelu" = tanh GELU).
The output is `(embeddings * mask, mask)`: padded positions are zeroed as the SAO T5Conditioner does.

Two registered builders read the `text_encoder` config section: "t5" (frozen; weights from `text_encoder.path` via
`load_t5_encoder`) and "embedded" (the same architecture, small and randomly initialised, trained with the
denoiser; its tokenizer is built from the dataset captions by `build_caption_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from musicdiff.parallel import DEFAULT_SHARDING_RULES, mesh_config
from musicdiff.errors import ConfigError, DataError
from musicdiff.models.registry import register
from musicdiff.parallel import make_mesh, param_shardings
from musicdiff.parallel.sharding import Rules, constrain

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
_CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "spiece.model",
                     "special_tokens_map.json"]


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of a T5 `config.json` that the encoder needs (defaults: t5-base)."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "T5EncoderConfig":
        """Picks the known fields out of a T5 config.json (or a config section); other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: values[k] for k in names if k in values})
        config.activation  # validates feed_forward_proj early
        return config

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # Hugging Face maps "gated-gelu" to the tanh approximation (gelu_new); other names are taken literally.
        name = "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]
        if name not in _ACTIVATIONS or len(self.feed_forward_proj.split("-")) > 2:
            raise ConfigError(
                f"feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT' with ACT one of "
                f"{', '.join(_ACTIVATIONS)}"
            )
        return name


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets [query, key] of (key - query): half the buckets per direction, exact up to
    num_buckets/4, then logarithmic up to max_distance. Float32 in the same order as Hugging Face, so the truncation
    at exact powers of two lands in the same bucket."""
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _scaled_normal(key: jax.Array, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    # One compiled program per shape: eager init would otherwise compile sample, scale and cast separately.
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: Any) -> jax.Array:
    return _scaled_normal(rngs.params(), tuple(shape), std, jnp.dtype(dtype))


class T5LayerNorm(nnx.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction, no bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * normed).astype(x.dtype)


class T5Attention(nnx.Module):
    """Multi-head self-attention without 1/sqrt(d) scaling; q/k/v kernels [d_model, heads, d_kv], out [heads, d_kv,
    d_model]. Initialised as Hugging Face's T5 (the query std carries the missing 1/sqrt(d_kv))."""

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        d, h, k = config.d_model, config.num_heads, config.d_kv
        names = ("embed", "heads", "kv")
        self.query = nnx.Param(_normal(rngs, (d, h, k), (d * k) ** -0.5, param_dtype), out_sharding=names)
        self.key = nnx.Param(_normal(rngs, (d, h, k), d**-0.5, param_dtype), out_sharding=names)
        self.value = nnx.Param(_normal(rngs, (d, h, k), d**-0.5, param_dtype), out_sharding=names)
        self.out = nnx.Param(_normal(rngs, (h, k, d), (h * k) ** -0.5, param_dtype),
                             out_sharding=("heads", "kv", "embed"))
        self.dtype = dtype

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x [B, T, D]; bias [B or 1, heads, T, T] float32 (relative positions plus the padding mask)."""
        cast = lambda p: p[...].astype(self.dtype)
        q = jnp.einsum("btd,dhk->bthk", x, cast(self.query))
        k = jnp.einsum("btd,dhk->bthk", x, cast(self.key))
        v = jnp.einsum("btd,dhk->bthk", x, cast(self.value))
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        context = jnp.einsum("bhqs,bshk->bqhk", weights, v)
        return jnp.einsum("bqhk,hkd->bqd", context, cast(self.out))


class T5FeedForward(nnx.Module):
    """`DenseReluDense`: wo(act(wi x)), or the gated v1.1 form wo(act(wi_0 x) * wi_1 x); no biases."""

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        d, f = config.d_model, config.d_ff
        self.gated = config.is_gated
        self.wi = nnx.Param(_normal(rngs, (d, f), d**-0.5, param_dtype), out_sharding=("embed", "mlp"))
        if self.gated:
            self.wi_gate = nnx.Param(_normal(rngs, (d, f), d**-0.5, param_dtype), out_sharding=("embed", "mlp"))
        self.wo = nnx.Param(_normal(rngs, (f, d), f**-0.5, param_dtype), out_sharding=("mlp", "embed"))
        self.activation = _ACTIVATIONS[config.activation]
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.activation(x @ self.wi[...].astype(self.dtype))
        if self.gated:
            hidden = hidden * (x @ self.wi_gate[...].astype(self.dtype))
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return hidden @ self.wo[...].astype(self.dtype)


class T5Block(nnx.Module):
    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.attention_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.attention = T5Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ff_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.ff = T5FeedForward(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        x = x + self.dropout(self.attention(self.attention_norm(x), bias), deterministic=rngs is None, rngs=rngs)
        return x + self.dropout(self.ff(self.ff_norm(x)), deterministic=rngs is None, rngs=rngs)


class T5Encoder(nnx.Module):
    """`(input_ids [B, T] int, attention_mask [B, T]) -> (embeddings [B, T, d_model] with pads zeroed, mask bool)`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (float32 unless asked). Dropout only runs
    when an `rngs` is passed to the call (training the embedded encoder); without it the encoder is deterministic.
    """

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.shared = nnx.Param(_normal(rngs, (config.vocab_size, config.d_model), 1.0, param_dtype),
                                out_sharding=("vocab", "embed"))
        self.relative_attention_bias = nnx.Param(
            _normal(rngs, (config.relative_attention_num_buckets, config.num_heads), config.d_model**-0.5, param_dtype),
            out_sharding=(None, "heads"),
        )
        self.blocks = nnx.List(
            [T5Block(config, rngs=rngs, dtype=self.dtype, param_dtype=param_dtype) for _ in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def position_bias(self, length: int) -> jax.Array:
        """[1, heads, T, T] float32 relative-position bias, shared by every layer."""
        buckets = relative_position_buckets(length, length, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance)
        values = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), jnp.asarray(buckets), axis=0)
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        mask = attention_mask.astype(bool)
        # Gathering from the fsdp-split table directly makes XLA rematerialise it; all-gather its embed dim first.
        table = constrain(self.shared[...], ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = self.dropout(x, deterministic=rngs is None, rngs=rngs)
        # Padded keys get the most negative float32, as Hugging Face adds (1 - mask) * finfo.min to the bias.
        mask_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        bias = self.position_bias(input_ids.shape[1]) + mask_bias
        for block in self.blocks:
            x = block(x, bias, rngs)
            x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        x = self.dropout(self.final_layer_norm(x), deterministic=rngs is None, rngs=rngs)
        return x * mask[..., None].astype(x.dtype), mask


# ------------------------------------------------------------------------------------------------ checkpoints


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


def _read_tensor(handle: Any, file: Path, key: str, header: dict[str, Any] | None) -> np.ndarray:
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


def _safetensors_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        return json.loads(stream.read(size))


def hf_t5_key_map(config: T5EncoderConfig) -> dict[str, tuple[tuple[Any, ...], Any]]:
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


def _ignored_key(key: str) -> bool:
    # Full T5 checkpoints carry a decoder and an LM head; an encoder-only load drops them.
    return key.startswith(("decoder.", "lm_head."))


def load_t5_encoder(path_or_name: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_SHARDING_RULES,
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> T5Encoder:
    """Builds the encoder from a Hugging Face T5 directory (or hub name) with every parameter placed on `mesh` by the
    logical-axis rules. Tensors stream one at a time from safetensors straight to their target sharding; no full
    host copy of the model and no random init happen. Missing or unexpected keys are refused with their names."""
    from safetensors import safe_open

    directory = resolve_checkpoint_dir(path_or_name)
    files = _safetensors_files(directory)
    config = T5EncoderConfig.from_mapping(json.loads((directory / "config.json").read_text()))
    mesh = mesh if mesh is not None else make_mesh(mesh_config())
    abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    graphdef, abstract_state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(abstract_state))
    shardings = {path: var.get_value() for path, var in nnx.to_flat_state(param_shardings(abstract_state, rules, mesh))}
    key_map = hf_t5_key_map(config)

    file_keys = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            file_keys[file] = [key for key in handle.keys() if not _ignored_key(key)]
    present = {key for keys in file_keys.values() for key in keys}
    unexpected = sorted(present - set(key_map))
    covered = {key_map[key][0] for key in present if key in key_map}
    missing = sorted(".".join(map(str, p)) for p in set(targets) - covered)
    if unexpected or missing:
        raise DataError(
            f"{directory}: checkpoint does not match its config.json; missing parameters: {missing or 'none'}; "
            f"unexpected keys: {unexpected or 'none'}"
        )

    loaded: dict[tuple[Any, ...], jax.Array] = {}
    for file, keys in file_keys.items():
        header = _safetensors_header(file)
        with safe_open(str(file), framework="numpy") as handle:
            for key in keys:
                path, transform = key_map[key]
                if path in loaded:  # the tied embedding copy
                    continue
                target = targets[path].get_value()
                array = np.asarray(transform(_read_tensor(handle, file, key, header)))
                if array.shape != target.shape:
                    raise DataError(f"{file}: {key} has shape {array.shape} after conversion, the model expects "
                                    f"{target.shape}; check config.json")
                loaded[path] = jax.device_put(array.astype(target.dtype), shardings[path])
    state = nnx.from_flat_state([(path, var.replace(loaded[path])) for path, var in targets.items()])
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------ tokenizers


class TextTokenizer:
    """AutoTokenizer from a directory (or hub name), padding and truncating to `max_length` (SAO: 128), numpy out."""

    def __init__(self, path_or_name: str | Path, max_length: int):
        from transformers import AutoTokenizer

        directory = resolve_checkpoint_dir(path_or_name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as err:
            raise DataError(f"{directory}: no usable tokenizer files ({err}); save one with save_pretrained") from None
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{'input_ids': int32 [B, max_length], 'attention_mask': bool [B, max_length]}."""
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="np")
        return {"input_ids": batch["input_ids"].astype(np.int32),
                "attention_mask": batch["attention_mask"].astype(bool)}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def build_caption_tokenizer(captions: Iterable[str], out_dir: str | Path, vocab_size: int) -> Path:
    """Trains a byte-level BPE tokenizer on the dataset captions (no download) and saves it where AutoTokenizer finds
    it. Byte-level means every caption round-trips exactly and nothing maps to <unk>. Ids: 0 <pad>, 1 </s>, 2 <unk>;
    an </s> is appended to every caption, as T5's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ConfigError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least "
                          f"{len(alphabet) + len(specials)} entries")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(list(captions), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return out


def load_caption_tokenizer(directory: str | Path, max_length: int) -> TextTokenizer:
    if not (Path(directory) / "tokenizer.json").is_file():
        raise DataError(f"{directory}: no tokenizer.json; build it with build_caption_tokenizer(captions, dir, size)")
    return TextTokenizer(directory, max_length)


# ------------------------------------------------------------------------------------------------ caching


@dataclasses.dataclass
class CaptionEmbeddings:
    """Encoder outputs of distinct captions: embeddings [N, T, D], mask [N, T] bool, caption -> row."""

    embeddings: np.ndarray
    mask: np.ndarray
    index: dict[str, int]

    def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray([self.index[c] for c in captions], dtype=np.int64)
        return self.embeddings[rows], self.mask[rows]


@nnx.jit
def _encode_batch(encoder: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Module level, so repeated encode_captions calls (one per precompute shard) reuse the compiled program.
    return encoder(input_ids, attention_mask)


def encode_captions(captions: Iterable[str], tokenizer: TextTokenizer, encoder: nnx.Module, *, batch_size: int = 32,
                    dtype: Any = np.float32) -> CaptionEmbeddings:
    """Runs the encoder once per distinct caption (in first-seen order), in fixed-size batches so that one compiled
    program serves every batch; the last batch is padded with empty captions and trimmed."""
    distinct = list(dict.fromkeys(captions))
    index = {caption: row for row, caption in enumerate(distinct)}
    embeddings, masks = [], []
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start:start + batch_size]
        tokens = tokenizer(chunk + [""] * (batch_size - len(chunk)))
        out, mask = _encode_batch(encoder, jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]))
        embeddings.append(np.asarray(out.astype(dtype))[: len(chunk)])
        masks.append(np.asarray(mask)[: len(chunk)])
    width = getattr(getattr(encoder, "config", None), "d_model", 0)
    if not distinct:
        return CaptionEmbeddings(np.zeros((0, tokenizer.max_length, width), dtype), np.zeros((0, tokenizer.max_length),
                                 bool), index)
    return CaptionEmbeddings(np.concatenate(embeddings), np.concatenate(masks), index)


# ------------------------------------------------------------------------------------------------ config builders


def _dtype(model_config: ml_collections.ConfigDict, key: str) -> Any:
    name = model_config.get(key, "float32")
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.text_encoder.{key}={name!r}: expected float32, bfloat16 or float16")
    return jnp.dtype(name)


def encoder_config_from(model_config: ml_collections.ConfigDict) -> T5EncoderConfig:
    """Sizes from the config section; a "t5" section without sizes reads them from `path`/config.json."""
    values = dict(model_config)
    if "d_model" not in values and values.get("path"):
        directory = resolve_checkpoint_dir(values["path"])
        values = {**json.loads((directory / "config.json").read_text()), **values}
    return T5EncoderConfig.from_mapping(values)


@register("t5")
def build_t5(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> T5Encoder:
    """Randomly initialised T5 of the configured size (describe, tests); real weights come from load_text_encoder."""
    return T5Encoder(encoder_config_from(model_config), rngs=rngs, dtype=_dtype(model_config, "dtype"),
                     param_dtype=_dtype(model_config, "param_dtype"))


@register("embedded")
def build_embedded(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> T5Encoder:
    """The small trainable encoder over the caption tokenizer's vocabulary."""
    return T5Encoder(encoder_config_from(model_config), rngs=rngs, dtype=_dtype(model_config, "dtype"),
                     param_dtype=_dtype(model_config, "param_dtype"))


def load_text_encoder(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
                      rules: Rules = DEFAULT_SHARDING_RULES) -> tuple[T5Encoder, TextTokenizer]:
    """The encoder and tokenizer a `text_encoder` config section selects: "t5" loads frozen weights from `path`
    (sizes in the section, if given, must agree with its config.json); "embedded" builds a fresh trainable encoder
    and loads the caption tokenizer from `tokenizer_path`."""
    if model_config.name == "t5":
        encoder = load_t5_encoder(model_config.path, mesh=mesh, rules=rules, dtype=_dtype(model_config, "dtype"),
                                  param_dtype=_dtype(model_config, "param_dtype"))
        for field in dataclasses.fields(T5EncoderConfig):
            if field.name != "dropout_rate" and field.name in model_config:
                loaded = getattr(encoder.config, field.name)
                if model_config[field.name] != loaded:
                    raise ConfigError(f"config.text_encoder.{field.name}={model_config[field.name]!r}: the checkpoint "
                                      f"at {model_config.path} has {loaded!r}; use "
                                      f"--config.text_encoder.{field.name}={loaded!r}")
        return encoder, TextTokenizer(model_config.path, model_config.max_length)
    if model_config.name == "embedded":
        tokenizer = load_caption_tokenizer(model_config.tokenizer_path, model_config.max_length)
        if len(tokenizer) > model_config.vocab_size:
            raise ConfigError(f"config.text_encoder.vocab_size={model_config.vocab_size}: the tokenizer at "
                              f"{model_config.tokenizer_path} has {len(tokenizer)} tokens; use at least that")
        return build_embedded(model_config, rngs), tokenizer
    raise ConfigError(f"config.text_encoder.name={model_config.name!r}: expected 't5' or 'embedded'")

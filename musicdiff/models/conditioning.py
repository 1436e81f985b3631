"""Conditioners and their routing into the denoiser, as stable-audio-tools' MultiConditioner (spec §5, §2.5).

The `conditioning` structure is the one in a stable-audio-tools `model_config.json`:
`{"configs": [{"id", "type", "config"}], "cond_dim", "default_keys"?}` with types
- "number": NumberConditioner (seconds_start / seconds_total); `fourier_features_type: "expo"` gives Stable Audio 3's
  seconds_total (fixed ExpoFourier features, spec §3.3), which SA3 routes both as the last cross-attention token and
  as the global vector;
- a registered text-encoder kind (models/text_encoder/registry.py), which gives the token width and any encoder this
  module owns; the built-in ones:
- "t5": text from a frozen T5. Its encoder is not part of this module's state (as in SAO, where T5 is absent from the
  checkpoint): pass precomputed `{"embeddings", "mask"}` (see text_encoder.encode_captions) or token ids together
  with `encoders={id: t5}` at call time; gradients never flow into it;
- "embedded": text from the small trainable T5-style encoder owned by this module (its `config` holds the sizes);
- "t5gemma": text from a frozen T5Gemma encoder (Stable Audio 3), passed like "t5"; SA3's entry sets
  `padding_mode: "learned"` (below);
- "beat_grid", "key_chroma": frame conditioners (models/frame_conditioner.py): a tempo as beat features, a key as
  pitch-class features, [B, F, frames] each, no parameters.
Routing (`cross_attention_cond_ids`, `global_cond_ids`, `input_concat_cond_ids`) builds the cross-attention tokens
[B, S, cond_dim] (sequence concatenation; SAO: 128 text + 1 + 1 timing tokens), their mask, the global embedding
(feature concatenation; SAO: [B, 1536], seconds_start first) and the input-concatenated features [B, F, frames]
(channel concatenation, as stable-audio-tools' input_concat_ids; the denoiser appends them to its input channels).

Classifier-free guidance, as the reference DiT: per sample with probability p (SAO 0.1) the cross-attention tokens
are replaced by zeros. The null condition keeps the mask unchanged (the reference zeroes only the tokens, and its DiT
ignores the mask, so zeroed pads still take softmax mass) and never touches the global embedding.
Input-concatenated (frame) conditions: training hides each one (zero features) with the probability its own
`config.dropout` gives, and the null condition hides them all, so classifier-free guidance also pushes generations
towards the prompt's tempo and key (stable-audio-tools keeps its input concatenation in the null condition; ours only
carries what a prompt states: models/frame_conditioner.py). With the key features kept, tonic accuracy on the
demo's 32 held-out prompts was 0.44; hidden, 0.66 (one run each at step 1600, CFG 5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from musicdiff.errors import ConfigError, DataError
from musicdiff.models.beat_grid import BeatGridConditioner
from musicdiff.models.denoiser import ConditioningInputs
from musicdiff.models.frame_conditioner import FrameConditioner
from musicdiff.models.key_chroma import KeyChromaConditioner
from musicdiff.models.number_embedding import NumberConditioner, torch_linear_init
from musicdiff.models.registry import register
from musicdiff.models.text_encoder import is_text_encoder, text_encoder_kind, text_encoder_names


PADDING_MODES = ("zero", "learned")


class TextConditioner(nnx.Module):
    """Text tokens [B, T, dim] -> [B, T, output_dim]; padded positions zero, or a learned vector.

    A Linear(dim -> output_dim, bias) runs when the widths differ or `project_out` is set (reference Conditioner);
    the padding is applied after it, as the reference does, so pads are exactly zero ("zero") or exactly the learned
    `padding_embedding` [output_dim] ("learned": Stable Audio 3's `padding_mode="learned"`, its checkpoint key
    `conditioner.conditioners.prompt.padding_embedding`). The mask is returned unchanged: SA3's DiT attends to every
    token, learned pads included, which here means `model.use_cross_attn_mask=False` (with the mask on, the DiT
    never reads the padding embedding). `encoder` is owned (trainable, "embedded"); a frozen encoder (T5, T5Gemma)
    is passed at call time instead.
    """

    # Its projection is a weight adapters' target, as the reference Conditioner's proj_out Linear is SA3 LoRA's.
    adaptable_kernels = {"kernel": 1}

    def __init__(self, dim: int, output_dim: int, *, rngs: nnx.Rngs, project_out: bool = False,
                 encoder: nnx.Module | None = None, padding_mode: str = "zero", dtype: Any = jnp.float32):
        if padding_mode not in PADDING_MODES:
            raise ConfigError(f"text conditioner padding_mode={padding_mode!r}: expected one of "
                              f"{', '.join(PADDING_MODES)}")
        self.encoder = encoder
        self.project = project_out or dim != output_dim
        if self.project:
            self.kernel = nnx.Param(torch_linear_init(rngs, dim, (dim, output_dim)),
                                    out_sharding=("embed", "cond_embed"))
            self.bias = nnx.Param(torch_linear_init(rngs, dim, (output_dim,)), out_sharding=("cond_embed",))
        if padding_mode == "learned":
            # Zero at init: a fresh conditioner pads exactly as "zero" does until training (or SA3's weights) move it.
            self.padding_embedding = nnx.Param(jnp.zeros((output_dim,), jnp.float32), out_sharding=("cond_embed",))
        self.padding_mode = padding_mode
        self.dim, self.output_dim, self.dtype = dim, output_dim, dtype

    def __call__(self, inputs: Mapping[str, jax.Array], frozen_encoder: nnx.Module | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        if "embeddings" in inputs:
            embeddings, mask = inputs["embeddings"], jnp.asarray(inputs["mask"]).astype(bool)
        elif self.encoder is not None:
            embeddings, mask = self.encoder(inputs["input_ids"], inputs["attention_mask"])
        elif frozen_encoder is not None:
            embeddings, mask = frozen_encoder(inputs["input_ids"], inputs["attention_mask"])
            embeddings = jax.lax.stop_gradient(embeddings)
        else:
            raise DataError("text condition: pass precomputed {'embeddings', 'mask'} or token ids with "
                            "encoders={id: text_encoder}")
        if embeddings.shape[-1] != self.dim:
            raise DataError(f"text condition: embeddings have width {embeddings.shape[-1]}, the conditioner expects "
                            f"{self.dim}")
        x = embeddings.astype(self.dtype)
        if self.project:
            x = x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
        if self.padding_mode == "learned":
            return jnp.where(mask[..., None], x, self.padding_embedding[...].astype(x.dtype)), mask
        return x * mask[..., None].astype(x.dtype), mask


def _plain(value: Any) -> Any:
    """ConfigDicts (and lists of them) to plain dicts and lists."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


FRAME_CONDITIONERS = {c.kind: c for c in (BeatGridConditioner, KeyChromaConditioner)}


def build_conditioner(entry: Mapping[str, Any], cond_dim: int, rngs: nnx.Rngs, dtype: Any = jnp.float32
                      ) -> nnx.Module:
    """One `{"id", "type", "config"}` entry of a stable-audio-tools conditioning config."""
    kind, config = entry["type"], dict(entry.get("config", {}))
    output_dim = config.get("output_dim", cond_dim)
    if kind == "number":
        return NumberConditioner(output_dim, config.get("min_val", 0.0), config.get("max_val", 1.0), rngs=rngs,
                                 features=config.get("fourier_features_type", "learned"), dtype=dtype)
    if kind in FRAME_CONDITIONERS:
        return FRAME_CONDITIONERS[kind].from_config(config)
    if is_text_encoder(kind):
        dim, encoder = text_encoder_kind(kind).conditioner_encoder(entry["id"], config, rngs, dtype)
        return TextConditioner(dim, output_dim, rngs=rngs, project_out=config.get("project_out", False),
                               encoder=encoder, padding_mode=config.get("padding_mode", "zero"), dtype=dtype)
    raise ConfigError(f"conditioning '{entry['id']}': type {kind!r} is not supported; use number, beat_grid, "
                      f"key_chroma or a text encoder ({', '.join(text_encoder_names())})")


def cfg_drop_masks(key: jax.Array, batch_size: int, prob: float | Mapping[str, float], ids: Sequence[str]
                   ) -> dict[str, jax.Array]:
    """Which samples drop which cross-attention condition ([B] bool per id); a pure function of the key.

    A float drops all `ids` together with one draw per sample (the reference: the whole context is nulled). A
    mapping {id: p} drops each id independently (ids it does not name are kept)."""
    if isinstance(prob, Mapping):
        keys = jax.random.split(key, len(ids))
        return {i: jax.random.bernoulli(k, prob.get(i, 0.0), (batch_size,)) for i, k in zip(ids, keys)}
    dropped = jax.random.bernoulli(key, prob, (batch_size,))
    return {i: dropped for i in ids}


def null_condition(cond: ConditioningInputs) -> ConditioningInputs:
    """The unconditional input for CFG: zero tokens, mask and global embedding kept (reference behaviour), and the
    frame features hidden (all zero, as training hides them), so guidance strengthens tempo and key as it does text."""
    hidden = None if cond.input_concat is None else jnp.zeros_like(cond.input_concat)
    return cond._replace(cross_tokens=jnp.zeros_like(cond.cross_tokens), input_concat=hidden)


class MultiConditioner(nnx.Module):
    """Runs every conditioner of a stable-audio-tools `conditioning` config and routes the outputs."""

    def __init__(self, conditioning: Mapping[str, Any], *, rngs: nnx.Rngs,
                 cross_attention_cond_ids: Sequence[str] = (), global_cond_ids: Sequence[str] = (),
                 input_concat_cond_ids: Sequence[str] = (), dtype: Any = jnp.float32):
        conditioning = _plain(conditioning)
        self.cond_dim = int(conditioning["cond_dim"])
        self.default_keys = dict(conditioning.get("default_keys", {}))
        entries = conditioning["configs"]
        self.conditioners = nnx.Dict({e["id"]: build_conditioner(e, self.cond_dim, rngs, dtype) for e in entries})
        for kind, ids in (("cross_attention_cond_ids", cross_attention_cond_ids), ("global_cond_ids", global_cond_ids),
                          ("input_concat_cond_ids", input_concat_cond_ids)):
            unknown = [i for i in ids if i not in self.conditioners]
            if unknown:
                raise ConfigError(f"{kind}: {unknown} name no conditioner; configured ids: {list(self.conditioners)}")
        framed = [i for i in input_concat_cond_ids if not isinstance(self.conditioners[i], FrameConditioner)]
        if framed:
            raise ConfigError(f"input_concat_cond_ids: {framed} give no frame-aligned features; only frame "
                              f"conditioners (beat_grid, key_chroma) can be concatenated to the input")
        self.cross_attention_cond_ids = tuple(cross_attention_cond_ids)
        self.global_cond_ids = tuple(global_cond_ids)
        self.input_concat_cond_ids = tuple(input_concat_cond_ids)

    @property
    def input_concat_channels(self) -> int:
        """Channels the routed input-concatenated features have (the denoiser's input_concat_dim)."""
        return sum(self.conditioners[i].channels for i in self.input_concat_cond_ids)

    def _input(self, inputs: Mapping[str, Any], cond_id: str) -> Any:
        if cond_id in inputs:
            return inputs[cond_id]
        fallback = self.default_keys.get(cond_id)
        if fallback is not None and fallback in inputs:
            return inputs[fallback]
        raise DataError(f"conditioning input '{cond_id}' is missing (inputs: {sorted(inputs)}); provide it or add a "
                        f"default_keys entry")

    def __call__(self, inputs: Mapping[str, Any], *, encoders: Mapping[str, nnx.Module] | None = None
                 ) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{id: (tokens [B, S, D], mask [B, S])}. Number inputs are [B] floats; text inputs are mappings with
        'embeddings'/'mask' (cached) or 'input_ids'/'attention_mask'."""
        encoders = encoders or {}
        outputs = {}
        for cond_id, conditioner in self.conditioners.items():
            value = self._input(inputs, cond_id)
            if isinstance(conditioner, TextConditioner):
                outputs[cond_id] = conditioner(value, encoders.get(cond_id))
            else:
                outputs[cond_id] = conditioner(value)
        return outputs

    def route(self, outputs: Mapping[str, tuple[jax.Array, jax.Array]],
              dropped: Mapping[str, jax.Array] | None = None) -> ConditioningInputs:
        """Concatenates cross-attention conditions along the sequence, global conditions along features and
        input-concatenated ones along channels (zeroing what `dropped` marks for a sample)."""
        tokens, masks = [], []
        for cond_id in self.cross_attention_cond_ids:
            t, m = outputs[cond_id]
            if t.ndim == 2:  # a pooled [B, D] condition is one token
                t, m = t[:, None], m.reshape(t.shape[0], 1)
            if dropped is not None and cond_id in dropped:
                t = jnp.where(dropped[cond_id][:, None, None], jnp.zeros_like(t), t)
            tokens.append(t)
            masks.append(m.astype(bool))
        if not tokens:
            raise ConfigError("cross_attention_cond_ids is empty; route at least one condition into cross-attention")
        globals_ = []
        for cond_id in self.global_cond_ids:
            t = outputs[cond_id][0]
            if t.ndim == 3:
                if t.shape[1] != 1:
                    raise ConfigError(f"global_cond_ids: '{cond_id}' gives {t.shape[1]} tokens; a global condition "
                                      f"must be a single vector")
                t = t[:, 0]
            globals_.append(t)
        global_embed = jnp.concatenate(globals_, axis=-1) if globals_ else None
        framed = []
        for cond_id in self.input_concat_cond_ids:
            features = outputs[cond_id][0]
            if dropped is not None and cond_id in dropped:
                features = jnp.where(dropped[cond_id][:, None, None], jnp.zeros_like(features), features)
            framed.append(features)
        input_concat = jnp.concatenate(framed, axis=1) if framed else None
        return ConditioningInputs(jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1), global_embed,
                                  input_concat)

    def condition(self, inputs: Mapping[str, Any], *, key: jax.Array | None = None,
                  cfg_dropout_prob: float | Mapping[str, float] = 0.0,
                  encoders: Mapping[str, nnx.Module] | None = None) -> ConditioningInputs:
        """Conditioner outputs, CFG dropout driven by `key` (training; none without a key), then routing."""
        outputs = self(inputs, encoders=encoders)
        dropped = None
        no_dropout = not cfg_dropout_prob if not isinstance(cfg_dropout_prob, Mapping) else not any(
            cfg_dropout_prob.values())
        batch = outputs[self.cross_attention_cond_ids[0]][0].shape[0]
        if key is not None and not no_dropout:
            dropped = cfg_drop_masks(key, batch, cfg_dropout_prob, self.cross_attention_cond_ids)
        hidden = {i: self.conditioners[i].dropout for i in self.input_concat_cond_ids if self.conditioners[i].dropout}
        if key is not None and hidden:
            # A key of its own, so the cross-attention draws stay those of a model without input conditions.
            dropped = dict(dropped or {}, **cfg_drop_masks(jax.random.fold_in(key, 1), batch, hidden, tuple(hidden)))
        return self.route(outputs, dropped)


@register("multi_conditioner")
def build_multi_conditioner(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MultiConditioner:
    """From a section with `conditioning`, `cross_attention_cond_ids`, `global_cond_ids` (as SAO's model_config)."""
    return MultiConditioner(model_config.conditioning, rngs=rngs,
                            cross_attention_cond_ids=tuple(model_config.get("cross_attention_cond_ids", ())),
                            global_cond_ids=tuple(model_config.get("global_cond_ids", ())),
                            input_concat_cond_ids=tuple(model_config.get("input_concat_cond_ids", ())))

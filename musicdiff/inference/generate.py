"""Text (+ timing) to audio with a trained or converted diffusion checkpoint.

The sampler is one pure function of (params, conditioning inputs, key, init, inpaint) built by `make_sampler` and
jit'ed once per (batch size, settings): conditioning, the whole sampler loop (one XLA while-loop, conditional and
unconditional passes batched together for classifier-free guidance) and nothing else. Decoding uses the chunked
Oobleck decoder, so long windows stay within memory.

Variable length: by default the model generates its whole training window, told by `seconds_total` where the content
ends (SAO, spec §4.5), and the audio is trimmed to `seconds_total`. With `length_bucket_frames` > 0 and a denoiser
declaring PADDING_MASK (Stable Audio 3, spec §4.6) only what the request needs is computed: a clip needs
ceil(seconds_total · latent rate) frames, a batch generates its longest clip's need rounded up to a multiple of
`length_bucket_frames` (at most the window; one compiled sampler per bucket), and each clip's frames past its need are
padding: masked out of self-attention, excluded from APG's projections and zeroed in the returned latents.
A length-aware `time_shift` (rectified-flow samplers; diffusion/time_shift.py) warps each clip's time grid at its
needed length, whichever mode generates it.
Audio-to-audio (spec §4.4) starts the sampler from the encoded init audio noised to `init_noise_level`.
Inpainting regenerates masked spans: a model trained with the inpainting input (LOCAL_CONDITIONING) is given the
mask and known latents as `local_cond` at every step; for any other model it is the RePaint-style fallback (the known
region is re-noised to each level and merged after every step; samplers' `Inpaint`), and the output metadata says
which (inference/inpainting.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicdiff.checkpoints import find_checkpoint, load_model
from musicdiff.diffusion.objectives import make_objective
from musicdiff.diffusion.parameterization import (cfg_denoiser, doubled_call, guidance_interval, make_denoiser,
                                                  projected_guidance_denoiser)
from musicdiff.diffusion.samplers import Inpaint, check_compatible, sample, sampler_spec
from musicdiff.diffusion.time_shift import TimeShift
from musicdiff.errors import ConfigError, DataError
from musicdiff.inference.inpainting import REPAINT_FALLBACK, TRAINED_INPUT, TRAINED_MERGE, local_inpaint_input
from musicdiff.models.conditioning import null_condition
from musicdiff.models.evaluator_labels import MODES, prompt_targets
from musicdiff.models.denoiser import (IMPLICIT_NULL_CONTEXT, LOCAL_CONDITIONING, PADDING_MASK, ConditioningInputs,
                                       capabilities)
from musicdiff.models.weight_adapters import (StackEntry, TimedAdapters, apply_adapters, load_adapter, run_adapter,
                                              untimed)
from musicdiff.parallel.sharding import unsharded

SAO_SIGMA_MIN, SAO_SIGMA_MAX = 0.3, 500.0
INPAINT_METHOD = REPAINT_FALLBACK  # models without the trained inpainting input


GUIDANCE = ("cfg", "apg")
INPAINTING_CHOICES = ("auto", "repaint", "trained_merge")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "dpmpp-3m-sde"
    steps: int = 100
    cfg_scale: float = 7.0
    cfg_rescale: float = 0.0
    cfg_sigma_min: float = 0.0  # guidance only at noise levels σ/α in [cfg_sigma_min, cfg_sigma_max]
    cfg_sigma_max: float = math.inf
    guidance: str = "cfg"  # "cfg" | "apg" (projected guidance on x0: parameterization.projected_guidance)
    apg_parallel: float = 0.0  # APG: weight of the guidance's part parallel to the conditional x0 estimate
    apg_norm_threshold: float = 0.0  # APG: clip the guidance to this norm per clip (0: no clip)
    sigma_min: float = SAO_SIGMA_MIN
    sigma_max: float = SAO_SIGMA_MAX
    rho: float = 1.0
    eta: float | None = None
    init_noise_level: float | None = None  # audio-to-audio: σ (or t for ddim / rectified-flow samplers)
    length_bucket_frames: int = 0  # > 0: generate only the frames a batch needs, in multiples of this (0: the window)
    time_shift: TimeShift = TimeShift()  # length-aware shift of rectified-flow time grids ("none": off)
    # "auto": the trained input when the model has it, else RePaint; "repaint": RePaint always; "trained_merge": the
    # trained input and the RePaint merge after every step (SA3's TensorRT port), for models with the input only
    inpainting: str = "auto"

    def __post_init__(self):
        spec = sampler_spec(self.sampler)
        if self.inpainting not in INPAINTING_CHOICES:
            raise ConfigError(f"config.inpainting={self.inpainting!r}: choose one of {', '.join(INPAINTING_CHOICES)}")
        if self.length_bucket_frames < 0:
            raise ConfigError(f"config.length_bucket_frames={self.length_bucket_frames}: use 0 (generate the whole "
                              f"window) or a positive number of latent frames")
        if self.time_shift.active and not spec.time_shiftable:
            raise ConfigError(f"config.time_shift.name={self.time_shift.name!r} warps rectified-flow time grids; "
                              f"config.sampler={self.sampler!r} has none: use rf-euler or pingpong, or name 'none'")
        if self.steps < 1:
            raise ConfigError(f"config.steps={self.steps}: must be at least 1")
        if self.guidance not in GUIDANCE:
            raise ConfigError(f"config.guidance={self.guidance!r}: choose one of {', '.join(GUIDANCE)}")
        if self.guidance == "apg" and self.cfg_rescale:
            raise ConfigError("config.cfg_rescale applies to guidance='cfg' only; APG bounds the guidance itself "
                              "(apg_parallel, apg_norm_threshold)")
        if not 0 <= self.cfg_sigma_min <= self.cfg_sigma_max:
            raise ConfigError(f"config.cfg_sigma_min={self.cfg_sigma_min}, cfg_sigma_max={self.cfg_sigma_max}: "
                              f"guidance needs 0 <= cfg_sigma_min <= cfg_sigma_max (noise levels σ/α)")
        if self.init_noise_level is not None and not self.init_noise_level > 0:
            raise ConfigError(f"config.init_noise_level={self.init_noise_level}: audio-to-audio needs a positive "
                              f"noise level to start from (σ, or t in (0, 1] for ddim / rf samplers)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SamplerSettings:
        """From a generate config, where init_noise_level <= 0 means "no audio-to-audio" and eta < 0 the sampler's
        default."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: config[k] for k in names if k in config}
        if values.get("init_noise_level", None) is not None and float(values["init_noise_level"]) <= 0:
            values["init_noise_level"] = None
        if values.get("eta", None) is not None and float(values["eta"]) < 0:
            values["eta"] = None
        if "time_shift" in values:
            values["time_shift"] = TimeShift.from_config(values["time_shift"])
        return cls(**values)


def guided_model(model: nnx.Module, cond: ConditioningInputs, scale: float | jax.Array, rescale: float = 0.0,
                 negative: ConditioningInputs | None = None, interval: tuple[float, float] | None = None,
                 **extras: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(x, t) -> the denoiser's output under classifier-free guidance with conditioner outputs `cond` and the null
    condition (`null_condition`: zero cross tokens and frame features, mask and global embedding kept), as one
    doubled batch. `negative` (a negative prompt's conditioner outputs) replaces the null condition's cross tokens
    and mask with its own; `interval`: model-time bounds of guidance (`guidance_interval`).
    `extras` (the denoiser's keyword inputs, e.g. adapter_inputs) go to both halves alike."""

    def model_out(x, t, c):
        return model(x, t, c, **_doubled(extras, x.shape[0]))

    # The null half (or the negative prompt) lives in doubled_model's call; cfg_denoiser needs no null of its own.
    return cfg_denoiser(model_out, cond, None, scale, rescale,
                        doubled_fn=doubled_model(model, cond, negative, **extras), interval=interval)


def doubled_model(model: nnx.Module, cond: ConditioningInputs, negative: ConditioningInputs | None = None,
                  **extras: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(x2, t2) -> the model on a doubled batch: `cond` for the first half, the null condition (or `negative`'s
    cross tokens and mask in it) for the second; the cheaper implicit null context when the model has it."""

    def cond_and_null(x2, t2):
        # The cross tokens go in for the conditional rows only: a denoiser with the implicit null context gives the
        # rows past them the null context (zero tokens) and skips their cross-attention, which zero tokens make
        # exactly zero. The other fields are doubled with their null halves.
        def with_null(a, n):
            return None if a is None else jnp.concatenate([a, n], axis=0)

        null = null_condition(cond)
        return model(x2, t2, cond._replace(global_embed=with_null(cond.global_embed, null.global_embed),
                                           input_concat=with_null(cond.input_concat, null.input_concat)),
                     **_doubled(extras, x2.shape[0]))

    null = null_condition(cond)
    if negative is not None:
        null = null._replace(cross_tokens=negative.cross_tokens, cross_mask=negative.cross_mask)
    if IMPLICIT_NULL_CONTEXT in capabilities(model) and negative is None:
        return cond_and_null
    return doubled_call(lambda x, t, c: model(x, t, c, **_doubled(extras, x.shape[0])), cond, null)


def _doubled(extras: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """Batch-leading extras repeated to `rows` (the doubled CFG batch); other leaves as they are."""
    def fit(leaf):
        leaf = jnp.asarray(leaf)
        if leaf.ndim and leaf.shape[0] != rows and rows % leaf.shape[0] == 0:
            return jnp.concatenate([leaf] * (rows // leaf.shape[0]), axis=0)
        return leaf

    return {name: jax.tree.map(fit, value) for name, value in extras.items()}


def inpainting_method(model: Any, settings: SamplerSettings) -> str:
    """TRAINED_INPUT for a model with the inpainting input (unless settings.inpainting forces "repaint"),
    TRAINED_MERGE when settings.inpainting asks for it, else REPAINT_FALLBACK."""
    trained = LOCAL_CONDITIONING in capabilities(model)
    if settings.inpainting == "trained_merge":
        if not trained:
            raise ConfigError(f"config.inpainting='trained_merge' needs a model trained with the inpainting input "
                              f"(model.local_cond_dim > 0); {type(model).__name__} has none: use auto or repaint")
        return TRAINED_MERGE
    return TRAINED_INPUT if trained and settings.inpainting != "repaint" else REPAINT_FALLBACK


def make_sampler(graphdefs: Mapping[str, Any], objective: Mapping[str, Any], settings: SamplerSettings,
                 shape: tuple[int, int, int], adapter_stack: Sequence[StackEntry] = ()) -> Callable[..., jax.Array]:
    """A pure `sample_fn(params, inputs, key, init=None, inpaint=None, negative=None, valid_frames=None) -> latents
    [B, C, L]`.

    `params` = {"model", "conditioner"} states; `inputs` = the MultiConditioner's inputs for a batch of B;
    `init` latents [B, C, L] for audio-to-audio (needs settings.init_noise_level); `inpaint` = (known latents
    [B, C, L], regenerate mask [B, 1, L]): the model's trained input when it declares LOCAL_CONDITIONING, else the
    RePaint-style merge; `negative` = (the encoded negative prompts, in the form of
    inputs["prompt"], and [B] bool: which rows have one; the others keep the null condition); `valid_frames` [B]
    int: the frames each row needs (default L). With settings.length_bucket_frames > 0 the frames past them are
    padding (the denoiser's padding_mask; zero in the result); settings.time_shift reads the longest row's need.
    Frame-conditioner features longer than L (they span the training window) are cut to L.
    `adapter_stack`: weight adapters with noise-level intervals, whose weights are params["adapters"]; the denoiser
    applies them at each step's model time, the conditioner (run once) with them on.
    """
    check_compatible(settings.sampler, objective["name"])
    training_objective = make_objective(objective)
    parameterization = training_objective.parameterization

    interval = None
    if settings.cfg_sigma_min > 0 or not math.isinf(settings.cfg_sigma_max):
        interval = guidance_interval(parameterization, settings.cfg_sigma_min, settings.cfg_sigma_max)

    def sample_fn(params, inputs, key, init=None, inpaint=None, negative=None, valid_frames=None):
        if init is not None and settings.init_noise_level is None:
            raise ConfigError("init latents were given but config.init_noise_level is not set (or <= 0): pass the "
                              "noise level to start from, e.g. --config.init_noise_level=1.0 (σ) or 0.5 (t, for "
                              "ddim / rf samplers)")
        model = nnx.merge(graphdefs["model"], params["model"])
        conditioner = nnx.merge(graphdefs["conditioner"], params["conditioner"])
        extras, pasted = {}, None
        method = None if inpaint is None else inpainting_method(model, settings)
        if method in (TRAINED_INPUT, TRAINED_MERGE):
            extras["local_cond"] = local_inpaint_input(*inpaint)
        if method == TRAINED_INPUT:  # no merge between steps; the known latents pasted back at the end
            pasted, inpaint = inpaint, None
        if adapter_stack:
            model = TimedAdapters(graphdefs["model"], params["model"], "model", adapter_stack, params["adapters"])
            conditioner = nnx.merge(graphdefs["conditioner"], apply_adapters(
                {"conditioner": params["conditioner"]}, untimed(adapter_stack), params["adapters"])["conditioner"])
        cond = _cut_to_length(conditioner.condition(inputs), shape[2])
        frames = jnp.full((shape[0],), shape[2], jnp.int32) if valid_frames is None else jnp.asarray(valid_frames)
        frame_mask = None
        if settings.length_bucket_frames:
            if PADDING_MASK not in capabilities(model):
                raise ConfigError(f"config.length_bucket_frames={settings.length_bucket_frames}: this model takes no "
                                  f"padding mask ({type(model).__name__}); use 0 to generate the whole window")
            frame_mask = jnp.arange(shape[2])[None, :] < frames[:, None]  # [B, L]
            extras["padding_mask"] = frame_mask

        negative_cond = None
        if negative is not None:
            encoded, has_negative = negative
            given = conditioner.condition({**inputs, "prompt": encoded})
            null = null_condition(cond)
            rows = jnp.asarray(has_negative, bool)
            negative_cond = given._replace(
                cross_tokens=jnp.where(rows[:, None, None], given.cross_tokens, null.cross_tokens),
                cross_mask=jnp.where(rows[:, None], given.cross_mask, null.cross_mask))
        if settings.guidance == "apg" and settings.cfg_scale != 1.0:
            doubled = make_denoiser(doubled_model(model, cond, negative_cond, **extras), parameterization)
            denoise = projected_guidance_denoiser(
                _zero_padding(doubled, frame_mask), settings.cfg_scale, settings.apg_parallel,
                settings.apg_norm_threshold, (settings.cfg_sigma_min, settings.cfg_sigma_max))
        else:
            guided = guided_model(model, cond, settings.cfg_scale, settings.cfg_rescale, negative=negative_cond,
                                  interval=interval, **extras)
            denoise = make_denoiser(guided, parameterization)
        inpaint_arg = None if inpaint is None else Inpaint(*inpaint)
        latents = sample(settings.sampler, denoise, key, shape, steps=settings.steps, sigma_min=settings.sigma_min,
                         sigma_max=settings.sigma_max, rho=settings.rho, eta=settings.eta, init=init,
                         init_sigma=settings.init_noise_level if init is not None else None, inpaint=inpaint_arg,
                         betas=training_objective.betas, max_sigma=parameterization.interpolant.max_sigma,
                         time_shift=settings.time_shift, shift_length=jnp.max(frames))
        if pasted is not None:  # the given audio is kept as given (as SA3's MLX and TensorRT ports; its PyTorch
            latents = jnp.where(pasted[1] > 0, latents, pasted[0])  # code returns the model's own context frames)
        return latents if frame_mask is None else jnp.where(frame_mask[:, None, :], latents, 0.0)

    return sample_fn


def _cut_to_length(cond: ConditioningInputs, length: int) -> ConditioningInputs:
    """cond with frame features (input_concat, spanning the training window) cut to the `length` frames generated."""
    if cond.input_concat is None or cond.input_concat.shape[-1] <= length:
        return cond
    return cond._replace(input_concat=cond.input_concat[..., :length])


def _zero_padding(doubled: Callable[..., jax.Array], frame_mask: jax.Array | None) -> Callable[..., jax.Array]:
    """A doubled-batch x0-denoiser whose estimates are zero on padded frames, so APG's per-clip norms and projections
    read the real frames only (spec §7: valid frames only)."""
    if frame_mask is None:
        return doubled
    mask = jnp.concatenate([frame_mask, frame_mask], axis=0)[:, None, :]  # conditional rows, then the other half

    def denoise(x, alpha, sigma):
        return jnp.where(mask, doubled(x, alpha, sigma), 0.0).astype(x.dtype)

    return denoise


def mask_from_spans(spec: str, total_seconds: float, frames: int, frame_rate: float) -> np.ndarray:
    """'start:end,start:end' in seconds -> [frames] float32, 1 = regenerate, 0 = keep (nearest latent frame)."""
    mask = np.zeros(frames, np.float32)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            start_text, end_text = part.split(":")
            start, end = float(start_text or 0.0), float(end_text or total_seconds)
        except ValueError:
            raise ConfigError(f"config.mask={spec!r}: each span is start:end in seconds, e.g. 2.5:4,8:") from None
        if not 0 <= start < end:
            raise ConfigError(f"config.mask span {part!r}: need 0 <= start < end")
        lo, hi = int(math.floor(start * frame_rate)), int(math.ceil(end * frame_rate))
        mask[max(lo, 0):min(hi, frames)] = 1.0
    if not mask.any():
        raise ConfigError(f"config.mask={spec!r}: selects no latent frame of the {total_seconds:.2f} s window")
    return mask


def conditioning_inputs(encoded: Mapping[str, Any], prompts: Sequence[str], seconds_start: Sequence[float],
                        seconds_total: Sequence[float]) -> dict[str, Any]:
    """The MultiConditioner's inputs at generation (host arrays): the encoded prompts, timing, and the tempo and key
    each prompt names ("... in E minor at 120 BPM") for frame conditioners with ids "tempo" (a beat at the start of
    the piece) and "key"; −1 / 0 where a prompt names none."""
    starts = np.asarray(seconds_start, np.float32)
    targets = [prompt_targets(p) for p in prompts]
    return {"prompt": {k: np.asarray(v) for k, v in encoded.items()}, "seconds_start": starts,
            "seconds_total": np.asarray(seconds_total, np.float32),
            "tempo": {"bpm": np.asarray([t.get("bpm", 0.0) for t in targets], np.float32), "beat_offset": -starts},
            "key": {"tonic": np.asarray([t.get("tonic", -1) for t in targets], np.int32),
                    "mode": np.asarray([MODES.index(t["mode"]) if "mode" in t else -1 for t in targets], np.int32)}}


class Generator:
    """A loaded diffusion checkpoint + its autoencoder + prompt encoder, ready to turn prompts into audio."""

    def __init__(self, config: ml_collections.ConfigDict, params: Mapping[str, Any], graphdefs: Mapping[str, Any],
                 autoencoder: nnx.Module, prompt_encoder: Any):
        self.config = config
        self.params = params
        self.graphdefs = graphdefs
        self.autoencoder = autoencoder
        self.prompt_encoder = prompt_encoder
        self.latent_channels = int(config.model.io_channels)
        self.latent_length = int(config.data.latent_length)
        self.sample_rate = int(autoencoder.config.sample_rate)
        self.ratio = int(autoencoder.downsampling_ratio)
        self._compiled: dict[Any, Callable] = {}
        self._executables: dict[Any, Callable] = {}
        self._decoded_shapes: set[tuple[int, ...]] = set()
        self.compile_seconds = 0.0  # spent compiling samplers and the decoder so far
        self.adapter_stack: tuple[StackEntry, ...] = ()  # adapters applied per step (those with an interval)
        self.adapters: list[dict[str, Any]] = []  # what load_adapters loaded, for the records

    @classmethod
    def from_checkpoint(cls, path: str, *, autoencoder_checkpoint: str = "", prefer_ema: bool = True) -> Generator:
        from musicdiff.inference.prompts import PromptEncoder

        ref = find_checkpoint(path)
        config = ref.config
        for section in ("model", "conditioner", "prompt_encoder", "objective"):
            if section not in config:
                raise ConfigError(f"checkpoint {ref.step_dir}: its config has no '{section}' section; it is not a "
                                  f"diffusion checkpoint (pass the workdir of launch.train_diffusion or convert)")
        modules = {name: load_model(ref, name, prefer_ema=prefer_ema) for name in ("model", "conditioner")}
        ae_path = autoencoder_checkpoint or config.get("autoencoder_checkpoint", "")
        if not ae_path:
            raise ConfigError("config.autoencoder_checkpoint: the diffusion checkpoint names no autoencoder; pass "
                              "--config.autoencoder_checkpoint=DIR")
        autoencoder = load_model(find_checkpoint(ae_path), "autoencoder")
        graphdefs = {name: nnx.graphdef(module) for name, module in modules.items()}
        params = {name: nnx.state(module, nnx.Param) for name, module in modules.items()}
        adapter = run_adapter(ref, modules)  # a launch.train_lora run: its base with its adapter folded in
        if adapter is not None:
            params = apply_adapters(params, [adapter[0]], [adapter[1]])
        return cls(config, params, graphdefs, autoencoder, PromptEncoder(config.prompt_encoder))

    def load_adapters(self, specs: Sequence[tuple[str, float]], sigma_interval: tuple[float, float] = (0.0, math.inf)
                      ) -> None:
        """Stacks weight-adapter files ((path, strength) pairs, in order) onto the model and conditioner. Without a
        noise-level interval (σ/α bounds, as cfg_sigma_min/max) they are folded into the weights once; with one, the
        denoiser applies them at each step whose noise level lies inside."""
        if not specs:
            return
        modules = {name: nnx.merge(self.graphdefs[name], self.params[name]) for name in ("model", "conditioner")}
        interval = None
        if sigma_interval[0] > 0 or not math.isinf(sigma_interval[1]):
            interval = guidance_interval(make_objective(self.config.objective).parameterization, *sigma_interval)
        loaded = [load_adapter(path, modules, strength=strength, interval=interval) for path, strength in specs]
        entries, weights = [entry for entry, _ in loaded], [tree for _, tree in loaded]
        base = {name: self.params[name] for name in ("model", "conditioner")}
        if interval is None:
            self.params = apply_adapters(base, entries, weights)
        else:
            self.params = {**base, "adapters": weights}
            self.adapter_stack = tuple(entries)
        self.adapters = [{"path": str(path), "strength": strength, "kind": entry.config.kind,
                          "rank": entry.config.rank} for (path, strength), entry in zip(specs, entries)]
        self._compiled.clear()
        self._executables.clear()

    def inpainting_method(self, settings: SamplerSettings) -> str:
        """How `inpaint` is carried out with these settings (`inpainting_method`)."""
        return inpainting_method(nnx.merge(self.graphdefs["model"], self.params["model"]), settings)

    @property
    def window_seconds(self) -> float:
        return self.latent_length * self.ratio / self.sample_rate

    def conditioning_inputs(self, prompts: Sequence[str], seconds_start: Sequence[float],
                            seconds_total: Sequence[float]) -> dict[str, Any]:
        return conditioning_inputs(self.prompt_encoder(prompts), prompts, seconds_start, seconds_total)

    def _sampler(self, settings: SamplerSettings, length: int) -> Callable:
        """The jit'ed batch sampler of `length` latent frames: one `make_sampler` program of batch 1 vmapped over
        per-clip keys (and needed frames), so a clip's audio depends on its own seed only, not on what else shares its
        batch."""
        if (settings, length) not in self._compiled:
            single = make_sampler(self.graphdefs, self.config.objective, settings,
                                  (1, self.latent_channels, length), self.adapter_stack)

            def batched(params, inputs, keys, init, inpaint, negative, valid_frames):
                def one(inputs_i, key, init_i, inpaint_i, negative_i, valid_i):
                    add_batch = functools.partial(jax.tree.map, lambda a: a[None])
                    return single(params, add_batch(inputs_i), key, add_batch(init_i), add_batch(inpaint_i),
                                  add_batch(negative_i), valid_i[None])[0]

                return jax.vmap(one)(inputs, keys, init, inpaint, negative, valid_frames)

            self._compiled[(settings, length)] = jax.jit(batched)
        return self._compiled[(settings, length)]

    def _executable(self, settings: SamplerSettings, args: tuple, length: int | None = None) -> Callable:
        """Ahead-of-time compiled sampler for these argument shapes and `length` latent frames (default the window);
        compile time goes to `compile_seconds`."""
        length = self.latent_length if length is None else length
        leaves, treedef = jax.tree.flatten(args)
        signature = (settings, length, treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))
        if signature not in self._executables:
            began = time.perf_counter()
            with unsharded():  # one program per clip batch: its inputs' placement decides the layout
                self._executables[signature] = self._sampler(settings, length).lower(*args).compile()
            self.compile_seconds += time.perf_counter() - began
        return self._executables[signature]

    def encode_audio(self, audio: np.ndarray) -> jax.Array:
        """[B, channels, samples] at the autoencoder rate -> posterior-mean latents [B, C, latent_length]."""
        from musicdiff.models.chunking import chunked_encode

        window = self.latent_length * self.ratio
        fitted = np.zeros((audio.shape[0], audio.shape[1], window), np.float32)
        fitted[..., : min(window, audio.shape[-1])] = audio[..., :window]
        with unsharded():
            latents, _ = chunked_encode(self.autoencoder, jnp.asarray(fitted))
        return latents

    def sample_latents(self, prompts: Sequence[str], seconds_total: Sequence[float], settings: SamplerSettings,
                       seeds: Sequence[int], *, seconds_start: Sequence[float] | None = None, init: jax.Array | None = None,
                       inpaint: tuple[jax.Array, jax.Array] | None = None,
                       negative_prompts: Sequence[str] | None = None) -> jax.Array:
        """Latents [B, C, L] for the prompts. `negative_prompts` (one per prompt, "" = none) replace the null
        condition of classifier-free guidance, so guidance steers away from them (no effect at cfg_scale 1)."""
        for seconds in seconds_total:
            if not 0 < seconds <= self.window_seconds + 1e-6:
                raise ConfigError(f"config.seconds_total={seconds}: this model generates windows of "
                                  f"{self.window_seconds:.2f} s; use 0 < seconds_total <= {self.window_seconds:.2f}")
        starts = seconds_start if seconds_start is not None else [0.0] * len(prompts)
        inputs = self.conditioning_inputs(prompts, starts, seconds_total)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        negative = None
        if negative_prompts is not None and any(negative_prompts):
            if len(negative_prompts) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
            encoded = {k: np.asarray(v) for k, v in self.prompt_encoder(list(negative_prompts)).items()}
            negative = (encoded, np.asarray([bool(p) for p in negative_prompts]))
        needed = np.asarray([self.frames_needed(seconds) for seconds in seconds_total], np.int32)
        length = self.generated_length(needed, settings)
        if length < self.latent_length:  # init and inpaint latents span the window: keep the generated frames
            init = None if init is None else init[..., :length]
            inpaint = None if inpaint is None else tuple(a[..., :length] for a in inpaint)
        args = (self.params, inputs, keys, init, inpaint, negative, needed)
        return self._executable(settings, args, length)(*args)

    def frames_needed(self, seconds: float) -> int:
        """Latent frames that hold `seconds` of audio (at least 1, at most the window)."""
        frames = math.ceil(round(seconds * self.sample_rate / self.ratio, 6))
        return min(max(frames, 1), self.latent_length)

    def generated_length(self, needed: np.ndarray, settings: SamplerSettings) -> int:
        """The latent frames a batch generates: the whole window, or with settings.length_bucket_frames its longest
        clip's need rounded up to a multiple of it (at most the window)."""
        bucket = settings.length_bucket_frames
        if not bucket:
            return self.latent_length
        patch = int(self.config.model.get("patch_size", 1))
        if bucket % patch:
            raise ConfigError(f"config.length_bucket_frames={bucket}: must be a multiple of the model's patch_size "
                              f"{patch}")
        model = nnx.merge(self.graphdefs["model"], self.params["model"])
        if PADDING_MASK not in capabilities(model):
            raise ConfigError(f"config.length_bucket_frames={bucket}: this model takes no padding mask "
                              f"({type(model).__name__}); use 0 to generate the whole window")
        return min(self.latent_length, -(-int(needed.max()) // bucket) * bucket)

    def decode(self, latents: jax.Array) -> np.ndarray:
        from musicdiff.models.chunking import chunked_decode

        with unsharded():
            if latents.shape not in self._decoded_shapes:  # compile (and time) the decoder once per shape
                began = time.perf_counter()
                jax.block_until_ready(chunked_decode(self.autoencoder, jnp.zeros_like(latents)))
                self.compile_seconds += time.perf_counter() - began
                self._decoded_shapes.add(latents.shape)
            return np.asarray(chunked_decode(self.autoencoder, latents))

    def trim(self, audio: np.ndarray, seconds_total: float) -> np.ndarray:
        return audio[..., : int(round(seconds_total * self.sample_rate))]


def read_prompts_file(path: str) -> list[dict[str, Any]]:
    """Prompts as a list of {prompt, ...}: a .jsonl file (one object a line with at least "prompt"; other keys such as
    seconds_total, seed or attributes are kept) or plain text (one prompt a line; blank lines skipped)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"config.prompts_file={path}: no such file")
    items = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not JSON ({err.msg}); each line is an object with a \"prompt\"")
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise DataError(f"{path}:{number}: each line needs a string \"prompt\"")
            items.append(item)
        else:
            items.append({"prompt": line.strip()})
    if not items:
        raise DataError(f"config.prompts_file={path}: holds no prompts")
    return items

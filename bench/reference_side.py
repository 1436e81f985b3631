"""The reference side of `make bench`: stable-audio-tools 0.0.19 on CPU PyTorch, run by the reference venv's python.

    .venv-ref/bin/python bench/reference_side.py        (started by bench/run_all.py, never by hand)

A worker that reads one JSON request per line on stdin and answers one JSON line on its own copy of stdout
(anything the libraries print goes to stderr). Requests:
    {"op": "info", "threads": N}            versions; sets torch's intra-op threads (inter-op: 1)
    {"op": "peak", "size": n, "repeats": r} fp32 matmul FLOP/s of an n×n torch matmul (best of r)
    {"op": "setup", "row": NAME, "params": {...}}   builds the row's model and inputs (no timing of use)
    {"op": "run"}                           one timed run of the current row -> {"seconds": s}
    {"op": "teardown"} / {"op": "quit"}
Only JSON crosses the process boundary (no pickle). The row definitions mirror bench/ours.py: the orchestrator sends
both sides the same shapes, batch sizes and model configs (the reference model_config blocks are exported from our
configs by musicdiff.convert.stable_audio_config, so the architectures are the same by construction).

This file imports only the standard library, numpy, soundfile, torch and the reference packages (the Stable Audio 3
one is the copy vendored under tests/reference/sa3, loaded through tests/sa3_reference.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_seeded(seed)) * scale


# ---- autoencoder ------------------------------------------------------------------------------------------------

def _autoencoder(model_config: dict):
    from stable_audio_tools.models.factory import create_model_from_config

    return create_model_from_config(model_config).eval().requires_grad_(False)


class AutoencoderEncode:
    """`AudioAutoencoder.encode` (encoder + VAE bottleneck, which always samples) of [B, 2, samples] audio."""

    def __init__(self, params: dict):
        self.model = _autoencoder(params["model_config"])
        self.audio = _randn((params["batch"], params["channels"], params["samples"]), 0, 0.1)

    def run(self) -> None:
        with torch.no_grad():
            self.model.encode(self.audio)


class AutoencoderDecode:
    """`AudioAutoencoder.decode` of [B, latent_dim, frames] latents."""

    def __init__(self, params: dict):
        self.model = _autoencoder(params["model_config"])
        self.latents = _randn((params["batch"], params["latent_dim"], params["frames"]), 1)

    def run(self) -> None:
        with torch.no_grad():
            self.model.decode(self.latents)


# ---- DiT --------------------------------------------------------------------------------------------------------

def _dit(params: dict):
    from stable_audio_tools.models.diffusion import DiTWrapper

    return DiTWrapper(diffusion_objective=params["objective"], **params["dit_config"])


def _conditioning(params: dict, batch: int) -> dict:
    """Precomputed conditioner outputs: cross-attention tokens (valid up to `valid_tokens`) and the global embedding."""
    tokens, valid = params["cond_tokens"], params["valid_tokens"]
    cross = _randn((batch, tokens, params["dit_config"]["cond_token_dim"]), 2)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[:, :valid] = True
    cross = cross * mask[..., None]
    out = dict(cross_attn_cond=cross, cross_attn_mask=mask)
    if params["dit_config"].get("global_cond_dim"):
        out["global_cond"] = _randn((batch, params["dit_config"]["global_cond_dim"]), 3)
    return out


class DiTTrainStep:
    """The reference training step's model work (DiffusionCondTrainingWrapper.training_step with the conditioner
    outputs precomputed): draw t and noise, noise the latents, DiT forward with 10% CFG dropout (every block
    activation-checkpointed, the reference's default), MSE to the objective's target, backward, AdamW step."""

    def __init__(self, params: dict):
        self.model = _dit(params).train()
        self.objective = params["objective"]
        self.batch = params["batch"]
        self.steps = params["steps_per_run"]
        self.x0 = _randn((self.batch, params["dit_config"]["io_channels"], params["length"]), 4)
        self.cond = _conditioning(params, self.batch)
        opt = params["optimizer"]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]),
                                           eps=opt["eps"], weight_decay=opt["weight_decay"])
        self.cfg_dropout_prob = params["cfg_dropout_prob"]

    def step(self) -> None:
        t = torch.rand(self.batch)
        noise = torch.randn_like(self.x0)
        if self.objective == "v":
            alphas, sigmas = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
            alphas, sigmas = alphas[:, None, None], sigmas[:, None, None]
            target = noise * alphas - self.x0 * sigmas
        else:  # rectified_flow
            alphas, sigmas = 1 - t[:, None, None], t[:, None, None]
            target = noise - self.x0
        noised = self.x0 * alphas + noise * sigmas
        output = self.model(noised, t, cfg_dropout_prob=self.cfg_dropout_prob, **self.cond)
        loss = torch.nn.functional.mse_loss(output, target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def run(self) -> None:
        for _ in range(self.steps):
            self.step()


class Sampling:
    """The sampling loop of `generate_diffusion_cond` with the conditioning precomputed: `sample_k` (v-models,
    k-diffusion DPM++ 3M SDE with its Brownian-tree noise) or `sample_rf` (rectified flow, ping-pong) over the
    DiTWrapper with batched CFG, exactly as the reference calls them."""

    def __init__(self, params: dict):
        self.model = _dit(params).eval().requires_grad_(False)
        self.params = params
        self.noise = _randn((params["batch"], params["dit_config"]["io_channels"], params["length"]), 5)
        self.cond = _conditioning(params, params["batch"])

    def run(self) -> None:
        from stable_audio_tools.inference.sampling import sample_k, sample_rf

        p = self.params
        with torch.no_grad():
            if p["objective"] == "v":
                sample_k(self.model, self.noise, steps=p["steps"], sampler_type=p["sampler"],
                         sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], rho=p["rho"], device="cpu",
                         cfg_scale=p["cfg_scale"], batch_cfg=True, rescale_cfg=True, **self.cond)
            else:
                sample_rf(self.model, self.noise, steps=p["steps"], sampler_type=p["sampler"],
                          sigma_max=p["sigma_max"], device="cpu", cfg_scale=p["cfg_scale"], batch_cfg=True,
                          **self.cond)


# ---- Stable Audio 3 -----------------------------------------------------------------------------------------------

def _sa3_package():
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from sa3_reference import import_reference

    return import_reference()


class SA3Generation:
    """What `StableAudioModel.generate` runs for one text-to-audio clip, from the conditioner on: the seconds_total
    number conditioner, the precomputed prompt tokens in T5Gemma's place, the all-zero inpainting input, then
    `sample_diffusion` (ping-pong, cfg 1, padding mask from seconds_total + headroom, the model's sampling shift)
    with `pretransform.decode` unchunked (the exported config's `chunked: false`)."""

    def __init__(self, params: dict):
        sa3 = _sa3_package()
        self.sample_diffusion = sa3.inference.sampling.sample_diffusion
        factory = sa3.factory.create_diffusion_cond_from_config
        self.wrapper = factory(params["model_config"]).eval().requires_grad_(False)
        self.params = params
        frames, channels = params["frames"], self.wrapper.io_channels
        self.conditioning = [{"seconds_total": params["seconds"]}]
        self.noise = _randn((1, channels, frames), 5)
        tokens = params["prompt_tokens"]
        prompt = _randn((1, tokens, params["prompt_dim"]), 2)
        self.fixed = dict(prompt=(prompt, torch.ones(1, tokens, dtype=torch.bool)),
                          inpaint_mask=[torch.zeros(1, 1, frames)],
                          inpaint_masked_input=[torch.zeros(1, channels, frames)])

    def run(self) -> None:
        p = self.params
        with torch.no_grad():
            tensors = self.wrapper.conditioner(self.conditioning, "cpu")
            inputs = self.wrapper.get_conditioning_inputs({**tensors, **self.fixed})
            self.sample_diffusion(
                model=self.wrapper.model, noise=self.noise, cond_inputs=inputs,
                diffusion_objective=self.wrapper.diffusion_objective, steps=p["steps"], cfg_scale=1.0,
                conditioning=self.conditioning, sample_rate=self.wrapper.sample_rate,
                pretransform=self.wrapper.pretransform, mask_padding_attention=True,
                use_effective_length_for_schedule=True, headroom_seconds=p["headroom_seconds"],
                dist_shift=self.wrapper.sampling_dist_shift, sampler_type="pingpong", disable_tqdm=True,
                chunked_decode=False)


# ---- data -------------------------------------------------------------------------------------------------------

def _load_with_soundfile(filename: str) -> torch.Tensor:
    import soundfile

    audio, rate = soundfile.read(filename, dtype="float32", always_2d=True)
    return torch.from_numpy(audio.T.copy()), rate


class PreEncode:
    """The loop of stable-audio-tools' pre_encode.py (spec §6.4) without Lightning: windows of every file
    (zero-padded to sample_size), batched, `model.encode` (sampled latents), then per item `<id>.npy` (latent) and
    `<id>.json` (metadata with the padding mask at latent resolution) under a fresh output folder."""

    def __init__(self, params: dict):
        self.model = _autoencoder(params["model_config"])
        self.files = [Path(f) for f in params["files"]]
        self.sample_size = params["sample_size"]
        self.batch_size = params["batch_size"]
        self.ratio = params["downsampling_ratio"]
        self.out_root = Path(tempfile.mkdtemp(prefix="ref_pre_encode_"))
        self.runs = 0

    def windows(self):
        for path in self.files:
            audio, rate = _load_with_soundfile(str(path))
            for index, start in enumerate(range(0, audio.shape[1], self.sample_size)):
                chunk = audio[:, start:start + self.sample_size]
                mask = torch.zeros(self.sample_size, dtype=torch.bool)
                mask[:chunk.shape[1]] = True
                padded = torch.nn.functional.pad(chunk, (0, self.sample_size - chunk.shape[1]))
                yield f"{path.stem}_{index}", padded, mask, start / rate, audio.shape[1] / rate

    def run(self) -> None:
        out = self.out_root / str(self.runs) / "0"
        out.mkdir(parents=True)
        self.runs += 1
        pending = []
        for item in self.windows():
            pending.append(item)
            if len(pending) == self.batch_size:
                self._encode(pending, out)
                pending = []
        if pending:
            self._encode(pending, out)

    def _encode(self, items, out: Path) -> None:
        audio = torch.stack([a for _, a, _, _, _ in items])
        with torch.no_grad():
            latents = self.model.encode(audio)
        frames = latents.shape[-1]
        for (name, _, mask, start, total), latent in zip(items, latents):
            np.save(out / f"{name}.npy", latent.numpy())
            small = torch.nn.functional.interpolate(mask[None, None].float(), size=frames, mode="nearest")[0, 0]
            meta = dict(padding_mask=small.bool().tolist(), seconds_start=start, seconds_total=total)
            (out / f"{name}.json").write_text(json.dumps(meta))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.out_root, ignore_errors=True)


class AudioPipeline:
    """stable-audio-tools' audio_dir SampleDataset (resample with torchaudio's Resample, PadCrop_Normalized_T random
    crop, PhaseFlipper, clamp, Stereo) through a torch DataLoader with the reference's collation_fn. File decoding
    goes through soundfile: torchaudio 2.11's `load` needs torchcodec and FFmpeg, which are not installable here."""

    def __init__(self, params: dict):
        from stable_audio_tools.data import dataset as reference_dataset

        class Config:
            path = params["root"]
            custom_metadata_fn = None

        sample_rate = params["sample_rate"]

        class SoundfileSampleDataset(reference_dataset.SampleDataset):
            def load_file(self, filename):
                from torchaudio import transforms

                audio, in_rate = _load_with_soundfile(filename)
                if in_rate != self.sr:
                    audio = transforms.Resample(in_rate, self.sr)(audio)
                return audio

        self.dataset = SoundfileSampleDataset([Config()], sample_size=params["sample_size"], sample_rate=sample_rate,
                                              random_crop=True)
        self.batch_size = params["batch_size"]
        self.batches = params["measure_clips"] // self.batch_size
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, num_workers=params["num_workers"],
            collate_fn=reference_dataset.collation_fn, persistent_workers=params["num_workers"] > 0, drop_last=True)
        self.iterator = self._endless()
        for _ in range(2):  # worker start-up and first reads
            next(self.iterator)

    def _endless(self):
        while True:
            yield from self.loader

    def run(self) -> None:
        for _ in range(self.batches):
            audio, _ = next(self.iterator)
        assert audio.shape[0] == self.batch_size


ROWS = {"ae_encode": AutoencoderEncode, "ae_decode": AutoencoderDecode, "dit_train": DiTTrainStep,
        "sampling": Sampling, "sa3_generate": SA3Generation, "precompute": PreEncode, "grain_pipeline": AudioPipeline}


def matmul_peak(size: int, repeats: int) -> float:
    a, b = _randn((size, size), 6), _randn((size, size), 7)
    a @ b
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def info(threads: int) -> dict:
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set by an earlier request
        torch.set_num_interop_threads(1)
    import importlib.metadata as metadata

    return {"torch": torch.__version__, "stable_audio_tools": metadata.version("stable-audio-tools"),
            "k_diffusion": metadata.version("k-diffusion"), "numpy": np.__version__,
            "threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "mkldnn": bool(torch.backends.mkldnn.is_available())}


def serve(requests, reply) -> None:
    row = None
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "info":
                answer = info(int(request["threads"]))
            elif op == "peak":
                answer = {"flops_per_second": matmul_peak(int(request["size"]), int(request["repeats"]))}
            elif op == "setup":
                began = time.perf_counter()
                row = ROWS[request["row"]](request["params"])
                answer = {"setup_seconds": time.perf_counter() - began}
            elif op == "run":
                began = time.perf_counter()
                row.run()
                answer = {"seconds": time.perf_counter() - began}
            elif op == "teardown":
                if hasattr(row, "close"):
                    row.close()
                row = None
                answer = {}
            elif op == "quit":
                reply.write(json.dumps({"ok": True}) + "\n")
                reply.flush()
                return
            else:
                raise ValueError(f"unknown op {op!r}")
            reply.write(json.dumps({"ok": True, **answer}) + "\n")
        except Exception:  # the orchestrator reports it and carries on with the next row
            reply.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\n")
        reply.flush()


def main() -> None:
    # Replies go to a private copy of stdout; whatever the libraries print (flash-attn notices, tqdm) to stderr.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, reply)


if __name__ == "__main__":
    main()

"""Variable-length generation on CPU: what a 10 s request costs next to a 20 s one when the sampler generates only the
frames the request needs (length buckets, musicdiff/inference/generate.py), and what both cost when the whole
training window is generated (the default, SAO's way).

    python -m bench.variable_length [--repeats=5] [--out=bench/results] [--conditions="..."]

The model: the :sao_small DiT and SAO Small's conditioning (bench/rows.py: rectified flow, the prompt as precomputed
T5-width embeddings, seconds_total) with the DiT narrowed to
embed 512, depth 8, 8 heads, fp32, with a 512-frame window at SAO's latent rate (44.1 kHz / 2048: 23.8 s). One run =
`make_sampler`'s compiled program for one clip: conditioning and 8 rf-euler steps (CFG 1) with the "full" length-aware
time shift, the program Generator runs per clip. 10 s needs 216 frames and 20 s 431, so with 32-frame buckets they
generate 224 and 448 frames under a padding mask; the window programs generate 512 for either. Each program is
compiled ahead of time and run once; then each of `repeats` rounds runs the 10 s and 20 s programs of one mode back to
back (which goes first alternates by round), so load drifts fall on both, and the claim reads the median of those
paired ratios (the ratio of the median times is recorded too; ratios from this one run). The claim checked: a 10 s generation costs at most 0.6x a 20 s
one. Results go to `<out>/variable_length-<host>-<date>.json` and `.md`, with the load averages before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

LATENT_RATE = 44100 / 2048  # SAO's latent frames per second
WINDOW = 512  # latent frames of the model's window (23.8 s)
BUCKET = 32  # config.length_bucket_frames
STEPS = 8
REQUESTS = {"10 s": 10.0, "20 s": 20.0}
CLAIM = 0.6  # a 10 s generation costs at most this fraction of a 20 s one
MODEL = dict(embed_dim=512, depth=8, num_heads=8, dtype="float32", remat="none")


def frames_needed(seconds: float) -> int:
    return math.ceil(round(seconds * LATENT_RATE, 6))


def bucketed_length(frames: int) -> int:
    return min(WINDOW, -(-frames // BUCKET) * BUCKET)


class ClipProgram:
    """make_sampler's program for one clip of `length` frames of which `needed` are requested."""

    def __init__(self, config, settings, length: int, needed: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from bench.ours import _compile
        from musicdiff.inference.generate import make_sampler
        from musicdiff.models import registry

        model = registry.build(config.model, nnx.Rngs(0))
        conditioner = registry.build(config.conditioner, nnx.Rngs(1))
        graphdefs = {"model": nnx.graphdef(model), "conditioner": nnx.graphdef(conditioner)}
        self.params = {"model": nnx.state(model, nnx.Param), "conditioner": nnx.state(conditioner, nnx.Param)}
        tokens, valid_tokens, width = 64, 12, 768  # T5-base width, as the :sao_small prompt conditioner reads
        mask = jnp.arange(tokens)[None, :] < valid_tokens
        embeddings = jax.random.normal(jax.random.key(2), (1, tokens, width)) * mask[..., None]
        self.inputs = {"prompt": {"embeddings": embeddings, "mask": mask},
                       "seconds_total": jnp.full((1,), needed / LATENT_RATE, jnp.float32)}
        if "seconds_start" in [entry["id"] for entry in config.conditioner.conditioning.configs]:
            self.inputs["seconds_start"] = jnp.zeros((1,), jnp.float32)
        self.length = length
        self.key = jax.random.key(6)
        self.needed = jnp.full((1,), needed, jnp.int32)
        sample_fn = make_sampler(graphdefs, config.objective, settings, (1, int(config.model.io_channels), length))
        self.sample, self.compile_seconds = _compile(
            lambda p, i, k, v: sample_fn(p, i, k, valid_frames=v), self.params, self.inputs, self.key, self.needed)

    def run(self) -> float:
        import jax

        began = time.perf_counter()
        jax.block_until_ready(self.sample(self.params, self.inputs, self.key, self.needed))
        return time.perf_counter() - began


def build_programs() -> dict[str, ClipProgram]:
    from bench.rows import diffusion_config
    from musicdiff.diffusion.time_shift import TimeShift
    from musicdiff.inference.generate import SamplerSettings

    config = diffusion_config("sao_small")  # SAO Small's conditioning: 64 T5 tokens + seconds_total
    config.model.update(MODEL)
    config.data.latent_length = WINDOW
    shift = TimeShift("full")
    bucketed = SamplerSettings(sampler="rf-euler", steps=STEPS, cfg_scale=1.0, sigma_max=1.0,
                               length_bucket_frames=BUCKET, time_shift=shift)
    window = SamplerSettings(sampler="rf-euler", steps=STEPS, cfg_scale=1.0, sigma_max=1.0, time_shift=shift)
    programs = {}
    for name, seconds in REQUESTS.items():
        needed = frames_needed(seconds)
        programs[f"{name} bucketed"] = ClipProgram(config, bucketed, bucketed_length(needed), needed)
        programs[f"{name} window"] = ClipProgram(config, window, WINDOW, needed)
    return programs


def measure(repeats: int) -> dict:
    load_before = os.getloadavg()
    programs = build_programs()
    for program in programs.values():
        program.run()  # warm
    seconds: dict[str, list[float]] = {name: [] for name in programs}
    paired: dict[str, list[float]] = {mode: [] for mode in ("bucketed", "window")}
    for round_index in range(repeats):
        for mode in paired:  # 10 s and 20 s back to back, first one then the other: load drifts hit both
            pair = [f"10 s {mode}", f"20 s {mode}"][:: 1 if round_index % 2 == 0 else -1]
            for name in pair:
                seconds[name].append(programs[name].run())
            paired[mode].append(seconds[f"10 s {mode}"][-1] / seconds[f"20 s {mode}"][-1])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = statistics.median(paired["bucketed"])
    return dict(
        claim=f"10 s costs <= {CLAIM} x 20 s (bucketed; median of paired ratios)", ratio_10s_over_20s=ratio,
        claim_met=ratio <= CLAIM, paired_ratios=paired,
        ratio_of_medians_10s_over_20s=medians["10 s bucketed"] / medians["20 s bucketed"],
        ratio_window_10s_over_20s=statistics.median(paired["window"]),
        speedup_10s_bucketed_over_window=medians["10 s window"] / medians["10 s bucketed"],
        medians_seconds=medians, runs_seconds=seconds,
        compile_seconds={name: program.compile_seconds for name, program in programs.items()},
        frames={name: {"needed": int(program.needed[0]), "generated": program.length}
                for name, program in programs.items()},
        model=dict(preset="sao_small", **MODEL, window_frames=WINDOW, latent_rate=LATENT_RATE),
        sampler=dict(sampler="rf-euler", steps=STEPS, cfg_scale=1.0, time_shift="full", bucket_frames=BUCKET),
        repeats=repeats, load_average_before=load_before, load_average_after=os.getloadavg())


def markdown(result: dict, host: str, date: str) -> str:
    rows = "\n".join(
        f"| {name} | {result['frames'][name]['needed']} | {result['frames'][name]['generated']} | "
        f"{median:.3f} | {result['compile_seconds'][name]:.1f} |"
        for name, median in result["medians_seconds"].items())
    verdict = "met" if result["claim_met"] else "NOT met"
    return (f"# Variable-length generation, CPU — {host}, {date}\n\n"
            f"{result['cores']} cores, jax {result['jax']}, commit {result['commit']}; load average (1/5/15 min) "
            f"before {_load(result['load_average_before'])}, after {_load(result['load_average_after'])}.\n"
            f"{result.get('conditions', '')}\n\n"
            f"Model: :sao_small DiT narrowed to embed {MODEL['embed_dim']}, depth {MODEL['depth']}, fp32, "
            f"{WINDOW}-frame window at {LATENT_RATE:.2f} frames/s; one clip, {STEPS} rf-euler steps, CFG 1, \"full\" "
            f"time shift; {result['repeats']} rounds of back-to-back 10 s / 20 s pairs.\n\n"
            f"| program | frames needed | frames generated | median s | compile s |\n|---|---|---|---|---|\n{rows}\n\n"
            f"**10 s / 20 s with buckets: {result['ratio_10s_over_20s']:.3f}** (median of the paired ratios "
            f"{_values(result['paired_ratios']['bucketed'])}; claim <= {CLAIM}: {verdict}; ratio of the median times "
            f"{result['ratio_of_medians_10s_over_20s']:.3f}); generating the whole window: "
            f"{result['ratio_window_10s_over_20s']:.3f}; a bucketed 10 s clip runs "
            f"{result['speedup_10s_bucketed_over_window']:.2f}x faster than the window program.\n")


def _load(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _values(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--conditions", default="", help="a note on what else ran on the machine")
    args = parser.parse_args()
    import jax

    result = measure(args.repeats)
    host = socket.gethostname()
    date = datetime.date.today().isoformat()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result.update(host=host, date=date, cores=len(os.sched_getaffinity(0)), jax=jax.__version__, commit=commit,
                  conditions=args.conditions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"variable_length-{host}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result, host, date))
    print(markdown(result, host, date))


if __name__ == "__main__":
    main()

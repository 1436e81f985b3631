"""`make bench`: every CPU row for musicdiff and the reference (stable-audio-tools 0.0.19, CPU PyTorch) side by side.

    python -m bench.run_all [--quick] [--rows=ae_encode,ae_decode,...] [--repeats=5] [--threads=N]
                            [--reference_python=.venv-ref/bin/python] [--conditions="..."]

The reference runs in its own venv as a worker process (bench/reference_side.py, JSON lines over pipes). For each
row both sides build the same model and inputs (shapes, batch, fp32), warm up (our side: ahead-of-time compile,
timed separately, then one run; the reference: one run), then run alternately, ours first on even rounds and the
reference first on odd ones, `repeats` times each; rows report medians. Both processes are pinned to the same
`threads` cores (CPU affinity, which XLA's CPU thread pool follows) and torch uses that many intra-op threads. The
machine's fp32 matmul peak is measured in the same run (a jnp and a torch matmul, before and after the rows; the
maximum) and each row's efficiency is its analytic FLOP/s over that peak. Results: bench/results/<host>-<date>.json
and .md (ratio = musicdiff throughput / reference throughput).
"""

from __future__ import annotations

import os
import sys


def _threads_from_argv(argv: list[str]) -> int:
    available = len(os.sched_getaffinity(0))
    for arg in argv:
        if arg.startswith("--threads="):
            return min(int(arg.split("=", 1)[1]), available)
    return available


THREADS = _threads_from_argv(sys.argv)
# Before JAX starts: XLA's CPU client sizes its thread pool from the affinity mask; the reference worker inherits it.
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from bench import fixtures  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.rows import Row, all_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

QUICK = flags.DEFINE_bool("quick", False, "small shapes and 3 repeats, for development (not a result)")
ROWS = flags.DEFINE_list("rows", [], "only these rows (names as in the table); default: all")
REPEATS = flags.DEFINE_integer("repeats", 0, "measured runs per side and row (default 5, quick 3)")
flags.DEFINE_integer("threads", THREADS, "cores both sides run on (default: all this process may use)")
REFERENCE_PYTHON = flags.DEFINE_string("reference_python", str(REPO / ".venv-ref" / "bin" / "python"),
                                       "python of the reference venv (make bench creates it)")
OUT = flags.DEFINE_string("out", str(RESULTS), "folder for the results")
CONDITIONS = flags.DEFINE_string("conditions", "", "a note on the machine's conditions (other work running, ...), "
                                 "written into the results")
PEAK_SIZE = flags.DEFINE_integer("peak_size", 4096, "n of the n×n fp32 matmuls that measure the peak")


class Reference:
    """The reference worker process: one JSON request per line, one JSON answer per line."""

    def __init__(self, python: str, log_path: Path):
        if not Path(python).exists():
            raise SystemExit(f"{python}: no reference venv; run `make bench` (it creates .venv-ref) or pass "
                             f"--reference_python")
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([python, str(REPO / "bench" / "reference_side.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=REPO)

    def call(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference worker exited (see {self.log.name})")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"reference {op} failed:\n{answer['error']}")
        return answer

    def close(self) -> None:
        try:
            self.call("quit")
        finally:
            self.process.wait(timeout=60)
            self.log.close()


def jax_matmul_peak(size: int, repeats: int = 4) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def measure_peak(reference: Reference, size: int) -> dict:
    return {"jax": jax_matmul_peak(size), "torch": reference.call("peak", size=size, repeats=4)["flops_per_second"]}


def _timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def measure_row(row: Row, reference: Reference, repeats: int) -> dict:
    """Builds both sides, warms up, alternates `repeats` measured runs each; frees both sides afterwards."""
    load_before = os.getloadavg()
    print(f"[{row.name}] building musicdiff side", flush=True)
    began = time.perf_counter()
    ours = row.build_ours()
    ours_setup = time.perf_counter() - began
    print(f"[{row.name}] building reference side", flush=True)
    ref_setup = reference.call("setup", row=row.reference_row, params=row.reference_params)["setup_seconds"]
    ours_warmup = _timed(ours.run)
    ref_warmup = reference.call("run")["seconds"]
    ours_times, ref_times = [], []
    for round_index in range(repeats):
        order = ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours")
        for side in order:
            if side == "ours":
                ours_times.append(_timed(ours.run))
            else:
                ref_times.append(reference.call("run")["seconds"])
        print(f"[{row.name}] round {round_index + 1}/{repeats}: musicdiff {ours_times[-1]:.3f} s, "
              f"reference {ref_times[-1]:.3f} s", flush=True)
    extra = {}
    if row.efficiency_basis == "decode_ceiling":
        extra["decode_ceiling_clips_per_second"] = fixtures.decode_ceiling_clips_per_second(
            Path(row.reference_params["root"]), int(row.shapes["crop_samples"]), THREADS, int(row.units_per_run))
    reference.call("teardown")
    if hasattr(ours, "close"):
        ours.close()
    compile_seconds = float(getattr(ours, "compile_seconds", 0.0))
    del ours
    gc.collect()
    jax.clear_caches()
    return dict(
        musicdiff=dict(runs_seconds=ours_times, median_seconds=statistics.median(ours_times),
                       warmup_seconds=ours_warmup, compile_seconds=compile_seconds, setup_seconds=ours_setup),
        reference=dict(runs_seconds=ref_times, median_seconds=statistics.median(ref_times),
                       warmup_seconds=ref_warmup, setup_seconds=ref_setup),
        load_average=dict(before=load_before, after=os.getloadavg()), **extra)


def machine_info(reference_info: dict) -> dict:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):  # no /proc/cpuinfo (macOS) or no model line: left blank
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return dict(host=socket.gethostname(), cpu=cpu, cores_used=THREADS, cores_total=os.cpu_count(),
                platform=platform.platform(), python=platform.python_version(), jax=jax.__version__,
                jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
                reference=reference_info)


def main(argv: list[str]) -> None:
    del argv
    quick = QUICK.value
    repeats = REPEATS.value or (3 if quick else 5)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="musicdiff_bench_") as tmp:
        workdir = Path(tmp)
        reference = Reference(REFERENCE_PYTHON.value, workdir / "reference_worker.log")
        try:
            reference_info = reference.call("info", threads=THREADS)
            peaks = [measure_peak(reference, PEAK_SIZE.value)]
            print(f"fp32 matmul peak: jax {peaks[0]['jax'] / 1e9:.1f} GFLOP/s, torch "
                  f"{peaks[0]['torch'] / 1e9:.1f} GFLOP/s", flush=True)
            rows = all_rows(workdir, quick, THREADS)
            if ROWS.value:
                unknown = sorted(set(ROWS.value) - {row.name for row in rows})
                if unknown:
                    raise SystemExit(f"--rows: unknown {unknown}; rows are {[row.name for row in rows]}")
                rows = [row for row in rows if row.name in ROWS.value]
            measured = []
            for row in rows:
                try:
                    measured.append((row, measure_row(row, reference, repeats)))
                except Exception as error:  # a failing row is reported, the others still run
                    print(f"[{row.name}] FAILED: {error}", flush=True)
                    measured.append((row, {"error": str(error)}))
            peaks.append(measure_peak(reference, PEAK_SIZE.value))
        finally:
            reference.close()
    report = dict(
        benchmark="musicdiff vs stable-audio-tools (CPU, fp32)", quick=quick, repeats=repeats,
        rows_selected=list(ROWS.value), conditions=CONDITIONS.value,
        date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine_info(reference_info),
        peak_measurements=peaks, wall_seconds=time.perf_counter() - started)
    json_path, md_path = write_report(report, measured, Path(OUT.value))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    app.run(main)

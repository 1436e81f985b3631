"""fp32 GEMM rates of XLA:CPU's GEMM backends against torch's, paired in one process, on the DiT's sampling shapes.

    python -m bench.gemm_backends [--repeats=8] [--out=bench/results]

Why: the 1025-token sampling rows are ~85% GEMMs, so their ratio is bounded by how fast XLA's fp32 GEMMs run next
to torch's (MKL) on the same cores. Each backend runs in its own process (XLA_FLAGS are read once, at start-up);
inside it, a jit'ed `a @ b` and torch's `a @ b` on the same data alternate call by call, so load drifts fall on both
and each pair gives a speed ratio (the row's value: the median of those ratios). Shapes: M = tokens (1025, or 2050
for a CFG-doubled batch), K x N = the block's projections (qkv, attention out, SwiGLU in, SwiGLU out) of :sao_small
(E = 1024) and :sao (E = 1536). Needs torch next to jax (the dev venv: `pip install -e '.[dev]'`).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# (name, XLA_FLAGS): the default Eigen path and the library backends XLA:CPU offers for dots.
BACKENDS = (
    ("eigen (default)", ""),
    ("onednn (--xla_cpu_use_onednn)", "--xla_cpu_use_onednn=true"),
    ("onednn fusion", "--xla_cpu_experimental_onednn_fusion_type=dot"),
    ("xnnpack fusion", "--xla_cpu_experimental_xnn_fusion_type=dot"),
    ("ynnpack fusion", "--xla_cpu_experimental_ynn_fusion_type=dot"),
)


def dit_gemm_shapes() -> list[tuple[str, int, int, int]]:
    shapes = []
    for preset, tokens, embed in (("sao_small", 1025, 1024), ("sao cfg", 2050, 1536)):
        for name, k, n in (("qkv", embed, 3 * embed), ("out", embed, embed), ("swiglu in", embed, 8 * embed),
                           ("swiglu out", 4 * embed, embed)):
            shapes.append((f"{preset} {name}", tokens, k, n))
    return shapes


def measure(repeats: int) -> list[dict]:
    """In this process (XLA_FLAGS already set): paired jnp / torch timings per shape."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    matmul = jax.jit(jnp.matmul)
    rows = []
    for name, m, k, n in dit_gemm_shapes():
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        aj, bj, at, bt = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        matmul(aj, bj).block_until_ready()
        torch.matmul(at, bt)
        jax_times, torch_times = [], []
        for _ in range(repeats):
            began = time.perf_counter()
            matmul(aj, bj).block_until_ready()
            jax_times.append(time.perf_counter() - began)
            began = time.perf_counter()
            torch.matmul(at, bt)
            torch_times.append(time.perf_counter() - began)
        flops = 2 * m * k * n
        rows.append(dict(shape=name, m=m, k=k, n=n,
                         jax_gflops_best=flops / min(jax_times) / 1e9, torch_gflops_best=flops / min(torch_times) / 1e9,
                         paired_speed_ratio_median=float(np.median(np.array(torch_times) / np.array(jax_times)))))
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.repeats)))
        return
    results = []
    for backend, flags in BACKENDS:
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        done = subprocess.run([sys.executable, "-m", "bench.gemm_backends", "--worker", f"--repeats={args.repeats}"],
                              env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            raise SystemExit(f"{backend}: the worker failed:\n{done.stderr[-3000:]}")
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(dict(backend=backend, xla_flags=flags, rows=rows))
        print(backend, " ".join(f"{r['paired_speed_ratio_median']:.2f}" for r in rows), flush=True)
    host, date = socket.gethostname(), datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(benchmark="XLA:CPU fp32 GEMM backends vs torch, paired", date=date, host=host,
                  cores=len(os.sched_getaffinity(0)), load_average_after=os.getloadavg(), results=results)
    (out / f"gemm_backends-{host}-{date}.json").write_text(json.dumps(report, indent=1) + "\n")
    shapes = [r["shape"] for r in results[0]["rows"]]
    lines = [f"# XLA:CPU fp32 GEMM backends vs torch (paired, one process each) — {host}, {date}", "",
             f"{report['cores']} cores; each cell: median over {args.repeats} pairs of (torch time / jax time), "
             f"i.e. XLA's speed relative to torch's on the same data, call by call; in brackets the best jax / "
             f"torch GFLOP/s.", "", "| backend | " + " | ".join(shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    for entry in results:
        cells = [f"{r['paired_speed_ratio_median']:.2f} ({r['jax_gflops_best']:.0f}/{r['torch_gflops_best']:.0f})"
                 for r in entry["rows"]]
        lines.append(f"| {entry['backend']} | " + " | ".join(cells) + " |")
    (out / f"gemm_backends-{host}-{date}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/gemm_backends-{host}-{date}.md")


if __name__ == "__main__":
    main()

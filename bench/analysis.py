"""What profiling found per row, written into the results next to the numbers.

Profiles: jax.profiler traces with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (per-thunk times, mapped to HLO
op names through the compiled module's text), cProfile and single-op timings on the torch side.
"""

ROW_ANALYSIS: dict[str, str] = {
    "ae_encode": (
        "Convolutions are on par (a k7 128-channel conv over 131k steps: XLA's NWC conv 98 GFLOP/s, torch/oneDNN "
        "87 GFLOP/s); the gain is the Snake activations: XLA fuses each exp/sin²/scale/add into one pass over the "
        "activation, torch runs five eager kernels per Snake (199 ms for one [128, 131072] Snake, about a third of "
        "the reference's encoder time). Weight norm is recomputed per call on both sides (negligible next to the "
        "convolutions)."),
    "ae_decode": (
        "As the encoder, plus the transposed convolutions: XLA's input-dilated convolution skips the inserted zeros "
        "(42-91 GFLOP/s on the decoder's four shapes) where torch's conv_transpose1d runs at 25-53 GFLOP/s. A "
        "polyphase rewrite (one stride-1 conv producing s·C_out channels) was measured and is slower on the wide "
        "blocks (22-40 GFLOP/s), so the layer stays as it is. The 2026-12-01 run reads 2.05×, at the target with "
        "little margin under that run's load (our runs 3.7-5.7 s, the reference's 9.5-11.6 s)."),
    "dit_train_tiny": (
        "Not a compute comparison: at this size both steps are overhead. Ours is one compiled program; the "
        "reference dispatches ~100 eager ops and autograd nodes per step, each a parallel region of torch's OpenMP "
        "pool, which makes it very sensitive to the shared machine's load: its 36 linear calls of a few "
        "microseconds of arithmetic took 224 ms under cProfile in an earlier profile, waiting for a second thread "
        "the 2-core machine did not schedule. The ratio moves with that load: 53.5x in an earlier run today (load "
        "4.6-6.8), 27x in the 2026-12-01 full run, whose reference runs spread 2.9-22.9 s (ours 0.22-0.31 s)."),
    "dit_train_sao_small": (
        "Profiled and fixed: before, 41% of our backward pass was transposes. XLA:CPU lowered the gradient dots of "
        "the multi-dimensional kernels ([E, 3, H, D] qkv, [E, 2, 4E] SwiGLU) with transposed copies of kernels and "
        "activations (copy_bitcast_fusion / wrapped_copy, up to 140 ms each, and the layer-norm backward chain fused "
        "into a strided transposed loop). attention.Linear now runs as one [M, K]·[K, N] GEMM whenever the "
        "sharding context allows merging those dims (no tensor or sequence split; otherwise the dot_general as "
        "before): a 2-block :sao_small backward went from 2.5 s to 1.24 s, its compile from 30 s to 10 s, and this "
        "row from 0.81× to 1.68× (a run earlier on 2026-12-01 at batch 2, before heads-major attention). The "
        "2026-12-01 full run, at this row's present batch of 1, reads 2.94×, but its reference runs spread "
        "15-34 s under load (ours 8.8-9.7 s); the shares of the load, the batch and the attention change in that "
        "rise were not separated. Both sides recompute every block in the backward pass (the "
        "reference's built-in checkpointing; our remat=full), so matmuls are ~90% of our step; the rest is "
        "attention softmax and elementwise work. Our per-GEMM rate in this step is 50-75 GFLOP/s against ~85 for a "
        "lone GEMM of the same shape (M = 257 tokens is small)."),
    "sample_sao_small_pingpong": (
        "One forward per step (cfg 1). Our forward is a single XLA program (no per-op dispatch, fused layer norms, "
        "rotary and SwiGLU gating); the reference pays eager per-op costs. Attention materialises the scores on "
        "both sides (ours heads-major on CPU, the reference torch's SDPA). At the 47.55 s clip (1025 tokens) the "
        "target is NOT met (1.35× in the 2026-12-01 run): ~90% of the step's FLOPs are GEMMs with M = 1025 tokens, "
        "and our step already runs at 79 GFLOP/s, the rate of XLA's own 4096² fp32 matmul measured in the same run (80 "
        "before the rows, 68 after), while torch's matmul reached 120/104 GFLOP/s. So the remaining gap is "
        "XLA:CPU's GEMM speed against torch's on this machine, not avoidable work; no fix for that was measured "
        "here (e.g. another XLA:CPU GEMM backend). At the preset's own 256-frame window the reference is far "
        "from its GEMM rate (22 GFLOP/s) and the row is 3.32× (`sample_sao_small_pingpong_native`)."),
    "sample_sao_small_pingpong_native": (
        "The same sampler at :sao_small's training window (256 frames, 257 tokens): smaller GEMMs, where the "
        "reference's eager per-op costs weigh more (reference 22 GFLOP/s, ours 74 GFLOP/s in the 2026-12-01 run)."),
    "sample_sao_dpmpp3msde": (
        "The target is NOT met (0.91× in the 2026-12-01 run). The step is large GEMMs (2 × 1025 tokens × 1536 "
        "wide, the conditional and unconditional passes as one doubled batch on both sides), and the reference "
        "runs them at 87.5 GFLOP/s, 73% of torch's 4096² matmul rate in the same run (120 GFLOP/s). Our loop "
        "(sampler arithmetic, noise, CFG combination fused into one compiled program; the reference runs "
        "k-diffusion's eager loop and Brownian-tree noise sampler between DiT calls) runs at 79.6 GFLOP/s, "
        "which is XLA's own 4096² fp32 matmul rate measured in that run (80 before the rows, 68 after): the "
        "fusion and avoided work are there, but XLA:CPU's GEMMs were ~1.5x slower than torch's on this machine "
        "under this load, and that dominates. Our runs also spread more under the shared machine's load "
        "(74-129 s for 2 steps against the reference's 95-114 s; our fastest run is 1.4× the reference's "
        "median). Not fixed: a faster CPU GEMM path for XLA (or a quiet-machine rerun) was not measured here."),
    "precompute": (
        "Ours includes everything the stage does (scan, plan and fingerprint, caption tokenizer, ArrayRecord "
        "shards, manifest); the batched jit'ed encoder is most of it. The reference's loop re-encodes with eager "
        "Snake activations (see ae_encode) and writes two files per window."),
    "grain_pipeline": (
        "Ours decodes only the crop (a soundfile seek) and resamples it with soxr, in read threads; the reference "
        "decodes each whole file, resamples it with torchaudio's Resample (the sinc kernel is rebuilt per call) and "
        "crops afterwards, in DataLoader worker processes."),
}

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
        "blocks (22-40 GFLOP/s), so the layer stays as it is."),
    "dit_train_tiny": (
        "Not a compute comparison: at this size both steps are overhead. Ours is one compiled program; the "
        "reference dispatches ~100 eager ops and autograd nodes per step, each a parallel region of torch's OpenMP "
        "pool. That makes it very sensitive to the shared machine's load: under heavier load (earlier runs) its 36 "
        "linear calls of a few microseconds of arithmetic took 224 ms under cProfile, waiting for a second thread "
        "the 2-core machine did not schedule, and the row read 50x; on a quieter machine it is ~2-3x."),
    "dit_train_sao_small": (
        "Profiled and fixed: before, 41% of our backward pass was transposes. XLA:CPU lowered the gradient dots of "
        "the multi-dimensional kernels ([E, 3, H, D] qkv, [E, 2, 4E] SwiGLU) with transposed copies of kernels and "
        "activations (copy_bitcast_fusion / wrapped_copy, up to 140 ms each, and the layer-norm backward chain fused "
        "into a strided transposed loop). attention.Linear now runs as one [M, K]·[K, N] GEMM whenever the "
        "sharding context allows merging those dims (no tensor or sequence split; otherwise the dot_general as "
        "before): a 2-block :sao_small backward went from 2.5 s to 1.24 s, its compile from 30 s to 10 s, and this "
        "row from 0.81× to above the 1.5× target. Both sides recompute every block in the backward pass (the "
        "reference's built-in checkpointing; our remat=full), so matmuls are ~90% of our step; the rest is "
        "attention softmax and elementwise work. Our per-GEMM rate in this step is 50-75 GFLOP/s against ~85 for a "
        "lone GEMM of the same shape (M = 257 tokens is small)."),
    "sample_sao_small_pingpong": (
        "One forward per step (cfg 1). Our forward is a single XLA program (no per-op dispatch, fused layer norms, "
        "rotary and SwiGLU gating); the reference pays eager per-op costs. Attention is XLA's (scores "
        "materialised) on our side and torch's SDPA on the reference's."),
    "sample_sao_dpmpp3msde": (
        "The reference is near this machine's fp32 peak here (large GEMMs: 2 × 1025 tokens × 1536 wide), so the "
        "margin comes from fusion and avoided work: the conditional and unconditional passes run as one doubled "
        "batch on both sides, our whole loop (sampler arithmetic, noise, CFG combination) is one compiled program "
        "with the elementwise work fused, while the reference runs k-diffusion's eager loop and its Brownian-tree "
        "noise sampler between DiT calls."),
    "precompute": (
        "Ours includes everything the stage does (scan, plan and fingerprint, caption tokenizer, ArrayRecord "
        "shards, manifest); the batched jit'ed encoder is most of it. The reference's loop re-encodes with eager "
        "Snake activations (see ae_encode) and writes two files per window."),
    "grain_pipeline": (
        "Ours decodes only the crop (a soundfile seek) and resamples it with soxr, in read threads; the reference "
        "decodes each whole file, resamples it with torchaudio's Resample (the sinc kernel is rebuilt per call) and "
        "crops afterwards, in DataLoader worker processes."),
}

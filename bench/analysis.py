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
        "convolutions). On a quiet machine the row is at or below the target: 2.01x in the first quiet run of "
        "2026-12-01 and 1.87x in the second, where the machine ran faster (4096² peaks 223-230 / 243-301 GFLOP/s "
        "jnp / torch against 153-173 / 248-278) and torch's convolutions gained more than ours; 2.27x in the "
        "loaded run, where load slowed the eager reference more. Not fixed: our convolutions are XLA's own (98 "
        "GFLOP/s on the k7 shape above)."
    ),
    "ae_decode": (
        "As the encoder, plus the transposed convolutions: XLA's input-dilated convolution skips the inserted "
        "zeros (42-91 GFLOP/s on the decoder's four shapes) where torch's conv_transpose1d runs at 25-53 GFLOP/s. "
        "A polyphase rewrite (one stride-1 conv producing s·C_out channels) was measured and is slower on the wide "
        "blocks (22-40 GFLOP/s), so the layer stays as it is. The quiet runs read 2.05x and 1.75x (see ae_encode "
        "for the second run's faster machine): the target is not held on a quiet machine."
    ),
    "dit_train_tiny": (
        "Not a compute comparison: at this size both steps are overhead. Ours is one compiled program; the "
        "reference dispatches ~100 eager ops and autograd nodes per step, each a parallel region of torch's OpenMP "
        "pool, which makes it very sensitive to load on the machine: 27x in the loaded run of 2026-12-01 (load "
        "3.6-5.8 on 2 cores), 3.9x and 2.9x in the two quiet runs."
    ),
    "dit_train_sao_small": (
        "The target is NOT met on a quiet machine (0.90x in the first quiet run, 1.10x in the second; the 2.94x of "
        "the loaded run was load falling on the eager reference, not a faster step). Both sides recompute every "
        "block in the backward pass (the reference's built-in checkpointing, our remat=full), so GEMMs are ~90% of "
        "the step, at M = 257 tokens. XLA's fp32 GEMMs are slower than torch's on this CPU: paired call by call "
        "with torch in one process on the DiT's own projection shapes (bench/gemm_backends.py, "
        "results/gemm_backends-vm-2026-12-01.md), XLA's default Eigen GEMM runs at 0.60-0.84x torch's speed, and "
        "none of XLA:CPU's other GEMM backends does better (oneDNN 0.51-0.86x, oneDNN/XNNPACK/YNNPACK fusions "
        "0.62-0.88x); the 4096² peaks say the same (jnp 153-230 GFLOP/s, torch 243-301 in the two quiet runs). At "
        "M = 257 the gap is widest (0.60-0.72x on the E = 1024 shapes). Fixed earlier: 41% of our backward pass "
        "had been transposes (XLA:CPU lowered the gradient dots of the multi-dimensional [E, 3, H, D] / [E, 2, 4E] "
        "kernels with transposed copies); attention.Linear now runs one [M, K]·[K, N] GEMM wherever the sharding "
        "allows, which halved a 2-block backward (2.5 -> 1.24 s). Reaching 1.5x needs 1.5x the reference's FLOP "
        "rate, i.e. GEMMs ~1.3x faster than torch's on the same shapes."
    ),
    "sample_sao_small_pingpong": (
        "The target is NOT met, and cannot be in fp32 on this machine: 1.5x the reference's FLOP rate in this row "
        "is above the machine's measured fp32 matmul peak (the reference runs its 1025-token forward at 190 / 227 "
        "GFLOP/s in the two quiet runs; 1.5x that is 285 / 340 GFLOP/s, against measured peaks of 278 / 301). One "
        "forward per step (cfg 1), ~86% GEMMs. XLA's fp32 GEMMs are slower than torch's on this CPU: paired call "
        "by call with torch in one process on the DiT's own projection shapes (bench/gemm_backends.py, "
        "results/gemm_backends-vm-2026-12-01.md), XLA's default Eigen GEMM runs at 0.60-0.84x torch's speed, and "
        "none of XLA:CPU's other GEMM backends does better (oneDNN 0.51-0.86x, oneDNN/XNNPACK/YNNPACK fusions "
        "0.62-0.88x); the 4096² peaks say the same (jnp 153-230 GFLOP/s, torch 243-301 in the two quiet runs). "
        "Profiled and fixed in this row: attention materialised the [heads, 1025, 1025] scores of all heads at "
        "once, and every softmax pass over them was memory-bound (XLA's exp reaches 0.5 G/s on a 34 MB tensor and "
        "2.2 G/s in cache on this VM); heads_major_attention now runs head by head above 8 MB of scores (same "
        "arithmetic, bit-identical): 52-62 -> 30 ms per self-attention (torch's SDPA: 21 ms) and the forward "
        "4.74-5.20 -> 4.31 s. What remains is the GEMM rate."
    ),
    "sample_sao_small_pingpong_native": (
        "The same sampler at :sao_small's training window (256 frames, 257 tokens). On a quiet machine the "
        "reference's eager per-op costs are small next to its GEMMs (it runs at ~60% of the peak), so the row is "
        "bound by the GEMM rate as the 1025-token one. XLA's fp32 GEMMs are slower than torch's on this CPU: "
        "paired call by call with torch in one process on the DiT's own projection shapes (bench/gemm_backends.py, "
        "results/gemm_backends-vm-2026-12-01.md), XLA's default Eigen GEMM runs at 0.60-0.84x torch's speed, and "
        "none of XLA:CPU's other GEMM backends does better (oneDNN 0.51-0.86x, oneDNN/XNNPACK/YNNPACK fusions "
        "0.62-0.88x); the 4096² peaks say the same (jnp 153-230 GFLOP/s, torch 243-301 in the two quiet runs). The "
        "3.32x of the loaded run was load slowing the reference's OpenMP regions."
    ),
    "sample_sao_dpmpp3msde": (
        "The target is NOT met (0.88x and 0.96x in the two quiet runs). The step is large GEMMs (2 x 1025 tokens x "
        "1536 wide, conditional and unconditional passes as one doubled batch on both sides) and the reference "
        "runs it at 193 / 211 GFLOP/s (69-70% of torch's 4096² peak); 1.1x needs 212 / 232 GFLOP/s, above what "
        "XLA's GEMMs reach on these shapes. XLA's fp32 GEMMs are slower than torch's on this CPU: paired call by "
        "call with torch in one process on the DiT's own projection shapes (bench/gemm_backends.py, "
        "results/gemm_backends-vm-2026-12-01.md), XLA's default Eigen GEMM runs at 0.60-0.84x torch's speed, and "
        "none of XLA:CPU's other GEMM backends does better (oneDNN 0.51-0.86x, oneDNN/XNNPACK/YNNPACK fusions "
        "0.62-0.88x); the 4096² peaks say the same (jnp 153-230 GFLOP/s, torch 243-301 in the two quiet runs). "
        "Fusion and avoided work, where the issue expected the gain: the sampler loop (sampler arithmetic, noise, "
        "CFG combination) is one compiled program against k-diffusion's eager loop and Brownian-tree noise "
        "sampler; self-attention runs head by head (290 -> ~150 ms per block at these shapes; torch's SDPA 76 ms); "
        "the unconditional half skips cross-attention, whose zero-token branch is exactly zero (bias-free "
        "projections; generate.guided_model, tested against the explicit zero tokens and the reference), ~5% of "
        "the step's FLOPs. FLOPs here count the reference's work (both halves), so our efficiency includes the "
        "skipped part. Together they do not make up for ~0.8x GEMMs."
    ),
    "precompute": (
        "Ours includes everything the stage does (scan, plan and fingerprint, caption tokenizer, ArrayRecord "
        "shards, manifest); the reference's loop re-encodes with eager Snake activations (see ae_encode) and "
        "writes two files per window. Profiled: in the first quiet run (0.60x) 4.6 s of our 10 s per run was "
        "restoring the autoencoder checkpoint (the reference builds its model once, outside the measured runs); "
        "precompute_latents now keeps the restored model for the next run with the same weights (content "
        "fingerprint) and mesh, which a researcher precomputing several folders in one process gets too. Second "
        "quiet run, with that: 0.67x (our runs 4.6-5.5 s, the reference's 2.7-3.8 s); what is left is the per-run "
        "work of a resumable, fingerprinted stage (scan, plan, caption tokenizer build, Grain windows, ArrayRecord "
        "shards with fsync, manifest) next to a bare loop, at a size (72 windows of a tiny model) where the "
        "encoder is a small part; not profiled further."
    ),
    "grain_pipeline": (
        "Ours decodes only the crop (a soundfile seek) and resamples it with soxr, in read threads; the reference "
        "decodes each whole file, resamples it with torchaudio's Resample (the sinc kernel is rebuilt per call) "
        "and crops afterwards, in DataLoader worker processes."
    ),
}

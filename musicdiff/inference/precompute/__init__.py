"""Precompute stage: audio windows -> autoencoder posterior + text, as ArrayRecord shards (data_pipelines.latent_source
documents the record schema, the file layout and the manifest).

Flow (`precompute_latents(config, workdir)`, every JAX process runs it):
1. Scan the audio folder (or open the TFDS build) and lay out consecutive `sample_size` windows of every clip
   (grain_pipeline.window_layout / window_dataset: no random crop, timing and padding mask as for training).
2. Windows are cut into shards of `windows_per_shard`; shard i belongs to process i mod process_count. The plan (the
   autoencoder's fingerprint, a hash of the inputs, every setting that changes the bytes written) is compared with
   what the workdir already holds: another autoencoder or other settings are refused unless `overwrite`.
3. Each process encodes its unfinished shards with the autoencoder on a mesh over its own devices (batched, sharded
   along the batch, one jit'ed program: each shard's last batch is padded to the fixed shape) and writes
   `shard-*.array_record.partial`, renamed to its final name when complete, then a summary `shard-*.json`. No
   computation spans processes (each mesh covers its own devices), so a process with fewer unfinished shards just
   reaches the final barrier sooner; the barriers use the coordination service, not device collectives.
4. After a barrier, process 0 writes manifest.json from the shard summaries. With several processes OUT must be
   a directory every process sees (a shared or network filesystem), as training reads it anyway.

Exactness: the bytes of a shard depend only on its windows and the plan. Batches never straddle shards and always
start at a shard's first window, text is encoded per shard (each distinct caption of a shard once, in a fixed batch
layout), and the embedded-mode tokenizer is built once (process 0, then a barrier) and reused on resume. A killed run
leaves finished shards (with matching summaries) and at most one partial per process; running again skips the former,
rewrites the latter from its first window, and the final files are byte-identical to an uninterrupted run's.

Modules: dataset.py (the clips), plan.py (plan, shard layout, resume status), window_encoder.py (audio -> latents),
outputs.py (shard writer, manifest), stage.py (the driver). Text goes through the text-encoder kind that
`text_encoder.name` names (musicdiff/models/text_encoder/registry.py): it prepares the workdir (the embedded kind's
caption tokenizer), gives each caption its record fields and writes the manifest's `text_encoder` entry.

Fault injection for tests: with MUSICDIFF_PRECOMPUTE_KILL_AFTER_WINDOWS=N the process SIGKILLs itself after writing
N records (mid-shard), as a crash would.
"""

from musicdiff.inference.precompute.dataset import Dataset, open_dataset
from musicdiff.inference.precompute.outputs import ShardWriter, write_manifest
from musicdiff.inference.precompute.plan import ShardLayout, make_plan, output_status, plan_sha256
from musicdiff.inference.precompute.stage import KILL_AFTER_ENV, STORAGE_DTYPES, precompute_latents
from musicdiff.inference.precompute.window_encoder import WindowEncoder

__all__ = ["KILL_AFTER_ENV", "STORAGE_DTYPES", "Dataset", "ShardLayout", "ShardWriter", "WindowEncoder", "make_plan",
           "open_dataset", "output_status", "plan_sha256", "precompute_latents", "write_manifest"]

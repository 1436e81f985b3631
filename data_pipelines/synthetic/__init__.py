"""The embedded default dataset: procedurally rendered CC0 music clips with captions and attributes.

`render.render_clip(seed)` makes one stereo clip (deterministic per seed); `writer.write_dataset(config, root)` renders
many in parallel into an audio folder (`ROOT/audio/NNNNNN.wav`, `ROOT/manifest.jsonl`, `ROOT/dataset_info.json`).
"""

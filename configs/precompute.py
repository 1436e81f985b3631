"""Precompute configs: `--config=configs/precompute.py:PRESET`, PRESET in tiny, sao (launch/precompute_latents.py).

    python -m launch.precompute_latents --config=configs/precompute.py:tiny \
        --config.autoencoder_checkpoint=AE_WORKDIR --config.data.root=AUDIO_FOLDER --workdir=LATENTS

- tiny: the demo: the `:tiny` autoencoder (256x, 172 frames/s), 65,536-sample windows (256 latent frames), embedded
  text (the caption tokenizer of configs/diffusion.py:tiny: vocabulary 1024, 32 tokens), float32 records.
- demo: tiny for configs/autoencoder.py:demo: 16 kHz mono, 65,536-sample windows (4.1 s, 256 latent frames).
- sao: Stable Audio Open: its VAE (2048x), 2,097,152-sample windows (1024 latent frames, SAO's training length),
  frozen t5-base (a local directory or hub name in text_encoder.path), bfloat16 records.

Keys:
- autoencoder_checkpoint: the autoencoder's training workdir, checkpoints dir or step dir (its config says how to
  rebuild it; its fingerprint is recorded and checked on every resume).
- overwrite: replace an output made with another autoencoder or other settings (otherwise refused).
- batch_size: windows per encoder call on each process, split over the local devices by the mesh (the last batch of
  every shard is padded to this shape, so one program is compiled).
- dtype: storage dtype of the latent posterior and T5 embeddings: float32, bfloat16 or float16.
- windows_per_shard: records per shard (a multiple of batch_size wastes no padding); shards are the unit of resume
  and of multi-host work (shard i is written by process i mod process_count).
- encode_chunk_frames / encode_overlap_frames: 0 encodes each window whole; otherwise in chunks of that many latent
  frames (musicdiff.models.chunking) to bound activation memory.
- text_batch_size: captions per text-encoder call.
- record_options: ArrayRecord writer options (group_size:1 gives random access for the training source).
- data.source: "audio_folder" (data.root holds manifest.jsonl) or "tfds" (data.root is a dataset directory built by
  data_pipelines.tfds_audio_folder). The scan settings (licence allowlist, silence, min_seconds) are those of
  configs/audio_folder.py; data.sample_rate / data.channels must match the autoencoder's.
- text_encoder: a configs/text_encoder.py section: name "t5" (frozen, embeddings stored) or "embedded" (caption
  tokenizer built into WORKDIR/tokenizer, token ids stored; tokenizer_path is set by the stage).
- distributed: multi-host start-up (musicdiff/parallel/distributed.py); every process runs the same command.
"""

import importlib.util
from pathlib import Path

import ml_collections

from data_pipelines.audio_folder import audio_folder_data
from musicdiff.config import choose_preset, stage_config


def _sibling(name: str):
    """Another config file of this folder as a module (config files are loaded by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"musicdiff_config_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _embedded_section() -> ml_collections.ConfigDict:
    section = _sibling("text_encoder").embedded()
    section.update(_sibling("diffusion").EMBEDDED_TEXT)  # the tokenizer size the tiny DiT's conditioner expects
    return section


# The text_encoder section of each text-encoder kind a preset's `text` may name.
TEXT_ENCODER_SECTIONS = {"t5": lambda: _sibling("text_encoder").t5_base(),
                         "t5gemma": lambda: _sibling("text_encoder").t5gemma_b(), "embedded": _embedded_section}


def _text_encoder(kind: str) -> ml_collections.ConfigDict:
    if kind not in TEXT_ENCODER_SECTIONS:
        raise ValueError(f"text encoder {kind!r} has no preset section; choose one of "
                         f"{', '.join(TEXT_ENCODER_SECTIONS)}")
    return TEXT_ENCODER_SECTIONS[kind]()


PRESETS = {
    "tiny": dict(sample_size=65536, batch_size=8, windows_per_shard=64, dtype="float32", text="embedded"),
    "demo": dict(sample_size=65536, batch_size=8, windows_per_shard=64, dtype="float32", text="embedded",
                 sample_rate=16000, channels=1,
                 text_max_length=48),  # with one token per digit, 99% of the embedded set's captions fit 39 tokens
    "sao": dict(sample_size=2097152, batch_size=8, windows_per_shard=512, dtype="bfloat16", text="t5"),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    preset = choose_preset(arg, PRESETS)
    c = stage_config(preset["batch_size"], distributed=True)
    c.autoencoder_checkpoint = ""
    c.overwrite = False
    c.root = ""  # alias of data.root (as configs/audio_folder.py)
    c.dtype = preset["dtype"]
    c.windows_per_shard = preset["windows_per_shard"]
    c.encode_chunk_frames = 0
    c.encode_overlap_frames = 32
    c.text_batch_size = 32
    c.record_options = "group_size:1"
    c.progress = True
    c.barrier_timeout_s = 7 * 24 * 3600.0  # the end-of-work barrier waits for the slowest process
    c.data = audio_folder_data(
        source="audio_folder",
        sample_rate=preset.get("sample_rate", 44100),
        channels=preset.get("channels", 2),
        sample_size=preset["sample_size"],
        random_crop=False,  # consecutive windows; the latent source crops at training time
    )
    c.text_encoder = _text_encoder(preset["text"])
    c.text_encoder.max_length = preset.get("text_max_length", c.text_encoder.max_length)
    return c

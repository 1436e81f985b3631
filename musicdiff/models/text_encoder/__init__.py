"""Text encoders: the T5 and T5Gemma networks, Hugging Face checkpoint loading, tokenizers, caption encoding, and the
registry of text-encoder kinds that config sections name.

    layers.py         what the networks share: RMSNorm, the (gated) feed-forward, float32 attention, mask bias
    t5.py             the T5 encoder network (Flax NNX)
    t5gemma.py        the T5Gemma encoder network (Stable Audio 3's) and its checkpoint loader
    hf_checkpoint.py  Hugging Face directory / hub resolution, safetensors reading, load_hf_encoder, load_t5_encoder
    tokenizers.py     TextTokenizer (AutoTokenizer) and the caption BPE tokenizer of the embedded encoder
    captions.py       encode_captions: each distinct caption through an encoder once
    registry.py       TextEncoderKind and its registry (register_text_encoder, text_encoder_kind, load_text_encoder)
    frozen.py         FrozenEmbeddingsKind: what encoders whose outputs precompute stores share
    builtin.py        the registered kinds "t5", "t5gemma" and "embedded"
"""

from musicdiff.models.text_encoder.captions import CaptionEmbeddings, encode_captions, encode_token_batch
from musicdiff.models.text_encoder.hf_checkpoint import (hf_t5_key_map, load_hf_encoder, load_t5_encoder,
                                                         read_safetensors_header, read_safetensors_tensor,
                                                         resolve_checkpoint_dir)
from musicdiff.models.text_encoder.registry import (TextEncoderKind, is_text_encoder, load_text_encoder,
                                                    prompt_from_batch, register_text_encoder, text_encoder_kind,
                                                    text_encoder_names)
from musicdiff.models.text_encoder.t5 import T5Encoder, T5EncoderConfig, relative_position_buckets
from musicdiff.models.text_encoder.t5gemma import (T5GemmaEncoder, T5GemmaEncoderConfig, hf_t5gemma_key_map,
                                                   load_t5gemma_encoder)
from musicdiff.models.text_encoder.tokenizers import TextTokenizer, build_caption_tokenizer, load_caption_tokenizer
from musicdiff.models.text_encoder.frozen import FrozenEmbeddingsKind
# Importing the built-in kinds registers them.
from musicdiff.models.text_encoder.builtin import (T5_DIMS, T5GEMMA_DIMS, TOKENIZER_DIR, EmbeddedKind, T5GemmaKind,
                                                   T5Kind, encoder_config_from)

__all__ = ["CaptionEmbeddings", "EmbeddedKind", "FrozenEmbeddingsKind", "T5Encoder", "T5EncoderConfig",
           "T5GEMMA_DIMS", "T5GemmaEncoder", "T5GemmaEncoderConfig", "T5GemmaKind", "T5Kind", "T5_DIMS",
           "TOKENIZER_DIR", "TextEncoderKind", "TextTokenizer", "build_caption_tokenizer", "encode_captions",
           "encode_token_batch", "encoder_config_from", "hf_t5_key_map", "hf_t5gemma_key_map", "is_text_encoder",
           "load_caption_tokenizer", "load_hf_encoder", "load_t5_encoder", "load_t5gemma_encoder",
           "load_text_encoder", "prompt_from_batch", "read_safetensors_header", "read_safetensors_tensor",
           "register_text_encoder", "relative_position_buckets", "resolve_checkpoint_dir", "text_encoder_kind",
           "text_encoder_names"]

"""Text encoders. `:t5_base` is the frozen SAO text encoder (spec §5.2: t5-base, 128 tokens, 768-d); `:t5gemma_b` is
Stable Audio 3's (spec §3.3: the google/t5gemma-b-b-ul2 encoder, 256 tokens, 768-d); `:embedded` is the small
encoder trained with the denoiser over a tokenizer built from the dataset captions (no download).

    python -m launch.describe --config=configs/text_encoder.py:t5_base --workdir=/tmp/describe_t5
"""

import ml_collections

from musicdiff.config import choose_preset, stage_config


def _frozen(name: str, path: str, max_length: int, **sizes) -> ml_collections.ConfigDict:
    """A frozen pretrained encoder: its checkpoint (a local Hugging Face directory, or a hub name fetched when online),
    prompt length in tokens and dtypes, then its sizes (checked against the checkpoint's config.json on load)."""
    return ml_collections.ConfigDict(dict(
        name=name, path=path, max_length=max_length,
        # compute dtype; the reference runs T5 in float16, bfloat16 is the TPU/GPU choice here (T5Gemma's attention
        # logits and softmax stay float32 whatever it is, spec §10)
        dtype="float32", param_dtype="float32", **sizes))


def t5_base() -> ml_collections.ConfigDict:
    return _frozen("t5", "t5-base", 128, vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                   num_heads=12, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="relu", layer_norm_epsilon=1e-6)


def t5gemma_b() -> ml_collections.ConfigDict:
    """Stable Audio 3's prompt encoder: 256 tokens (its MLX and TensorRT pipelines) and the sizes the spec gives; the
    ones it leaves open (num_key_value_heads, query_pre_attn_scalar, sliding_window, rope_theta) come from the
    checkpoint's config.json on load, and a section without `hidden_size` takes all sizes from there."""
    return _frozen("t5gemma", "google/t5gemma-b-b-ul2", 256, vocab_size=256000, hidden_size=768,
                   intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, head_dim=64,
                   hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=50.0, rms_norm_eps=1e-6)


def embedded() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="embedded",
        tokenizer_path="",  # directory written by text_encoder.build_caption_tokenizer
        tokenizer_from="",  # "": build the tokenizer from the captions; a tokenizer directory: copy that one
        split_digits=True,  # one token per digit: tempos that differ by a few BPM share tokens
        max_length=64,
        dtype="float32",
        param_dtype="float32",
        vocab_size=4096,  # the tokenizer's size must not exceed this
        d_model=256,
        d_kv=64,
        d_ff=1024,
        num_layers=4,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,  # active only when the training step passes dropout rngs
    ))


PRESETS = {"t5_base": t5_base, "t5gemma_b": t5gemma_b, "embedded": embedded}


def get_config(arg: str = "t5_base") -> ml_collections.ConfigDict:
    config = stage_config()
    config.text_encoder = choose_preset(arg, PRESETS)()
    return config

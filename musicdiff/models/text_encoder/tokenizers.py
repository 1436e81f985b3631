"""Tokenizers: a checkpoint's own (AutoTokenizer, padded to a fixed length) and the byte-level BPE caption tokenizer
built from the dataset captions for the embedded encoder."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from musicdiff.errors import ConfigError, DataError
from musicdiff.models.text_encoder.hf_checkpoint import resolve_checkpoint_dir

class TextTokenizer:
    """AutoTokenizer from a directory (or hub name), padding and truncating to `max_length` (SAO: 128), numpy out."""

    def __init__(self, path_or_name: str | Path, max_length: int):
        from transformers import AutoTokenizer

        directory = resolve_checkpoint_dir(path_or_name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as err:
            raise DataError(f"{directory}: no usable tokenizer files ({err}); save one with save_pretrained") from None
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{'input_ids': int32 [B, max_length], 'attention_mask': bool [B, max_length]}."""
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="np")
        return {"input_ids": batch["input_ids"].astype(np.int32),
                "attention_mask": batch["attention_mask"].astype(bool)}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def build_caption_tokenizer(captions: Iterable[str], out_dir: str | Path, vocab_size: int,
                            split_digits: bool = False) -> Path:
    """Trains a byte-level BPE tokenizer on the dataset captions (no download) and saves it where AutoTokenizer finds
    it. Byte-level means every caption round-trips exactly and nothing maps to <unk>. Ids: 0 <pad>, 1 </s>, 2 <unk>;
    an </s> is appended to every caption, as T5's tokenizer does. `split_digits` makes every digit its own token, so
    nearby numbers share tokens ("147" and "150" share "1"; whole-number tokens relate 147 to 150 in no way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ConfigError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least "
                          f"{len(alphabet) + len(specials)} entries")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(list(captions), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return out


def load_caption_tokenizer(directory: str | Path, max_length: int) -> TextTokenizer:
    if not (Path(directory) / "tokenizer.json").is_file():
        raise DataError(f"{directory}: no tokenizer.json; build it with build_caption_tokenizer(captions, dir, size)")
    return TextTokenizer(directory, max_length)

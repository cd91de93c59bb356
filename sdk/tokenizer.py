"""The calibrator's own tokenizer: a byte-level BPE trained on the calibrator's training text.

Byte-level BPE covers every string a target can produce, so the calibrator can read any target's output
after re-tokenizing it. One special token, ``<|endoftext|>`` (id 0), serves as BOS, EOS and padding.
"""

from __future__ import annotations

from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_id(tok: Tokenizer) -> int:
    tid = tok.token_to_id(SPECIAL)
    if tid is None:
        raise ValueError(f"calibrator tokenizer has no {SPECIAL} token")
    return tid


def hf_vocab_tokens(tokenizer: Any) -> list[str | None]:
    """Id-ordered token strings of a transformers tokenizer (base vocabulary plus added tokens)."""
    return list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))

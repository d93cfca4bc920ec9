"""Caption tokenizer: byte-pair encoding trained on training-split captions only.

It is saved in the prepared cache and copied into every checkpoint, so search tokenizes queries
exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD, UNK, CLS, MASK = "[PAD]", "[UNK]", "[CLS]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, MASK)  # PAD first: id 0 is padding everywhere


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self._tok = tokenizer
        self.pad_id: int = tokenizer.token_to_id(PAD)
        self.unk_id: int = tokenizer.token_to_id(UNK)
        self.cls_id: int = tokenizer.token_to_id(CLS)
        self.mask_id: int = tokenizer.token_to_id(MASK)

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> TextTokenizer:
        """Learn a BPE vocabulary of at most `vocab_size` entries from `texts`."""
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def tokens(self, text: str) -> list[str]:
        """The subword pieces of one text (for inspection and tests)."""
        return self._tok.encode(text).tokens

    def encode_batch(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 (N, max_len), 0-padded and truncated, and the lengths int32 (N,).

        A text with no tokens at all (empty or whitespace) encodes as one [UNK] so that every
        row has at least one real position for masked pooling.
        """
        ids = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
        lengths = np.zeros(len(texts), dtype=np.int32)
        for i, enc in enumerate(self._tok.encode_batch(list(texts))):
            row = enc.ids[:max_len] or [self.unk_id]
            ids[i, :len(row)] = row
            lengths[i] = len(row)
        return ids, lengths

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text))

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then a few special tokens."""

from __future__ import annotations

from collections.abc import Sequence

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 264  # 259 used, rounded up so the embedding rows align


class ByteTokenizer:
    bos_id = BOS
    eos_id = EOS
    pad_id = PAD
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, BOS)
        if eos:
            ids.append(EOS)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Special and out-of-range ids are dropped; a split UTF-8 sequence decodes with replacement."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

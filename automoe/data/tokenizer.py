"""Tokenizers that need no download: the byte-level tokenizer (256 byte ids + BOS/EOS/PAD)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

NUM_BYTES = 256


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer. Documents are separated by `eos_id`."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are the ids 0..255; then BOS=256, EOS=257, PAD=258 (vocab 259).

    `num_content_ids` generalizes the layout for synthetic data (ids [0, n), specials n, n+1, n+2);
    text can only be encoded with the default 256.
    """

    def __init__(self, num_content_ids: int = NUM_BYTES) -> None:
        if num_content_ids < 1:
            raise ValueError(f"ByteTokenizer.num_content_ids={num_content_ids} must be >= 1")
        self.num_content_ids = num_content_ids
        self.bos_id = num_content_ids
        self.eos_id = num_content_ids + 1
        self.pad_id = num_content_ids + 2
        self.vocab_size = num_content_ids + 3

    def encode(self, text: str) -> list[int]:
        """-> the UTF-8 bytes of `text` as ids (no BOS/EOS added)."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """-> uint8 array [len(utf8 bytes)]: the fast path `encode` uses; no Python int per byte."""
        if self.num_content_ids != NUM_BYTES:
            raise ValueError(f"ByteTokenizer.num_content_ids={self.num_content_ids}: only 256 encodes text")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        """-> text of the byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(f"ByteTokenizer.decode: id {int(arr[bad][0])} is outside [0, {self.vocab_size})")
        arr = arr[arr < min(self.num_content_ids, NUM_BYTES)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

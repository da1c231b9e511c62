"""Tokenizers: the byte-level tokenizer (256 byte ids + BOS/EOS/PAD, no files), a Hugging Face tokenizer from
local files (`HFTokenizer`), and `load_tokenizer` / `tokenizer_info`, which the token-file sidecar records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

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


# End-of-text tokens a bare tokenizer.json may use, tried in order when no tokenizer_config.json names one.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")


class HFTokenizer:
    """A Hugging Face tokenizer read from local files only: a directory with `tokenizer_config.json` (through
    `transformers.AutoTokenizer`, which knows the special tokens) or a bare `tokenizer.json` (the `tokenizers`
    library; EOS/BOS found among the usual special-token names, or given).

    Documents are encoded without special tokens; `add_bos` is True when the tokenizer's own encoding starts
    with BOS (Llama style), and then the data pipeline starts every document with it. `vocab_size` counts the
    added tokens (it can be below a model's padded embedding size).
    """

    def __init__(
        self, path: str | Path, *, eos_token: str | None = None, bos_token: str | None = None
    ) -> None:
        path = Path(path)
        self.path = path.resolve()
        self.name = path.name if path.is_dir() else path.parent.name
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            self._init_transformers(path)
        else:
            file = path / "tokenizer.json" if path.is_dir() else path
            if not file.is_file():
                raise ValueError(f"tokenizer {str(path)!r}: no tokenizer.json or tokenizer_config.json there")
            self._init_tokenizers(file)
        if eos_token is not None:
            self.eos_id = self._token_id(eos_token)
        if bos_token is not None:
            self.bos_id = self._token_id(bos_token)
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {str(path)!r} has no end-of-text token (none of {list(EOS_CANDIDATES)}): name it "
                "(prepare_data --eos-token TOKEN)"
            )
        self.pad_id = self.pad_id if self.pad_id is not None else self.eos_id
        self.add_bos = self.bos_id is not None and self._encode_with_specials("a")[:1] == [self.bos_id]

    def _init_transformers(self, path: Path) -> None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._hf, self._fast = hf, getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        self.vocab_size = len(hf)
        self.eos_id, self.bos_id, self.pad_id = hf.eos_token_id, hf.bos_token_id, hf.pad_token_id

    def _init_tokenizers(self, file: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._hf, self._fast = None, RustTokenizer.from_file(str(file))
        self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for t in EOS_CANDIDATES if (i := self._fast.token_to_id(t)) is not None), None)
        self.bos_id = next((i for t in BOS_CANDIDATES if (i := self._fast.token_to_id(t)) is not None), None)
        self.pad_id = None

    def _token_id(self, token: str) -> int:
        found = self._fast.token_to_id(token) if self._fast is not None else None
        if found is None and self._hf is not None:
            found = self._hf.convert_tokens_to_ids(token)
        if found is None or found == getattr(self._hf, "unk_token_id", None):
            raise ValueError(f"tokenizer {str(self.path)!r} has no token {token!r}")
        return int(found)

    def _encode_with_specials(self, text: str) -> list[int]:
        if self._hf is not None:
            return list(self._hf(text)["input_ids"])
        return list(self._fast.encode(text).ids)

    def encode(self, text: str) -> list[int]:
        """-> ids of `text` without special tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """-> ids of each text without special tokens (the Rust tokenizer encodes a batch on every core)."""
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self._hf(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        """-> text of `ids`, special tokens dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._fast.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the token -> id table: equal exactly when two tokenizers split alike."""
        vocab = (
            self._fast.get_vocab(with_added_tokens=True) if self._fast is not None else self._hf.get_vocab()
        )
        blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_tokenizer(spec: str | None, *, key: str = "tokenizer", **special: str | None) -> Tokenizer:
    """None or "byte" -> `ByteTokenizer`; else `HFTokenizer` of a local directory / tokenizer.json, or of a hub id
    already in the local HF cache (`automoe.hf.hub.resolve_local`; never downloaded). `key` names the setting
    in errors; `special`: eos_token / bos_token overrides."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    from automoe.hf.hub import resolve_local

    return HFTokenizer(resolve_local(spec, key=key), **special)


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the token-file sidecar records of the tokenizer (name, path, fingerprint, vocab size, special ids)."""
    hf = isinstance(tokenizer, HFTokenizer)
    return {
        "tokenizer": tokenizer.name if hf else "byte",
        "tokenizer_path": str(tokenizer.path) if hf else None,
        "tokenizer_fingerprint": tokenizer.fingerprint() if hf else None,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "add_bos": bool(getattr(tokenizer, "add_bos", False)),
    }

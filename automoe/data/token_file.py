"""Pre-tokenized corpora on disk: a flat uint16/uint32 token file read through `numpy.memmap`.

Layout: `corpus.bin` holds the raw little-endian ids; `corpus.json` beside it (same stem) holds
`{"format", "dtype", "num_tokens", "vocab_size", "bos_id", "eos_id", "pad_id", "tokenizer"}` plus, from
`prepare_data`, the tokenizer's `tokenizer_path`, `tokenizer_fingerprint` and `add_bos` (`tokenizer_info`): training
compares them with the model's tokenizer.
The sidecar is written last, so a file without one is an unfinished write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "automoe-tokens-v1"
DTYPES = ("uint16", "uint32")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON metadata file that belongs to token file `path` (`x.bin` -> `x.json`)."""
    return Path(path).with_suffix(".json")


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest supported dtype holding every id below `vocab_size`."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


class TokenFileWriter:
    """Streams token chunks to `path`; `close()` writes the sidecar. Use as a context manager."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        tokenizer: str = "byte",
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype_for_vocab(vocab_size)).newbyteorder("<")
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "dtype": dtype_for_vocab(vocab_size),
            "num_tokens": 0,
            "vocab_size": vocab_size,
            "bos_id": bos_id,
            "eos_id": eos_id,
            "pad_id": pad_id,
            "tokenizer": tokenizer,
            **(extra or {}),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(self.path).unlink(missing_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed in close()

    def write(self, ids: np.ndarray | list[int]) -> None:
        """Append ids [n]; every id must lie in [0, vocab_size)."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.meta["vocab_size"]):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.meta['vocab_size']})")
        self._file.write(arr.astype(self.dtype).tobytes())
        self.meta["num_tokens"] += int(arr.size)

    def close(self) -> dict[str, Any]:
        """Flush the tokens, then write the sidecar; -> the metadata."""
        if not self._file.closed:
            self._file.close()
            tmp = sidecar_path(self.path).with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
            os.replace(tmp, sidecar_path(self.path))
        return dict(self.meta)

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no sidecar: a half-written file must not look complete
            self._file.close()


def read_token_file(path: str | os.PathLike, *, field: str = "path") -> tuple[np.ndarray, dict[str, Any]]:
    """-> (read-only memmap of the ids [num_tokens], metadata). `field` names the config key in errors."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise ValueError(f"DataConfig.{field}={str(path)!r}: token file does not exist")
    if not meta_path.is_file():
        raise ValueError(
            f"DataConfig.{field}={str(path)!r}: sidecar {meta_path.name} is missing (unfinished write?)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("dtype") not in DTYPES:
        raise ValueError(
            f"DataConfig.{field}={str(path)!r}: sidecar has format={meta.get('format')!r} "
            f"dtype={meta.get('dtype')!r}, expected {FORMAT!r} with one of {list(DTYPES)}"
        )
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    num_tokens = int(meta["num_tokens"])
    if path.stat().st_size != num_tokens * dtype.itemsize:
        raise ValueError(
            f"DataConfig.{field}={str(path)!r}: holds {path.stat().st_size} bytes, sidecar says "
            f"{num_tokens} x {dtype.itemsize}"
        )
    if num_tokens == 0:
        raise ValueError(f"DataConfig.{field}={str(path)!r}: token file is empty")
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,)), meta

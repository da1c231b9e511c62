"""Lazy reading and sharded writing of HF safetensors checkpoints (`model.safetensors` or shards + index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsReader:
    """Key -> tensor access over one checkpoint directory; headers only until a tensor is asked for.

    `shape(key)` / `dtype(key)` read nothing but the file header; `get(key)` reads that one tensor (and records it
    in `read_keys`, so tests can prove that a rank never touched another rank's experts); `get_rows(key, ids)`
    reads only rows `ids` of a tensor's first dim (a fused expert tensor: only those experts; recorded in
    `read_keys` and, with the rows, in `read_rows`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index, single = self.path / INDEX_NAME, self.path / SINGLE_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_NAME)
        else:
            raise ValueError(f"no {INDEX_NAME} or {SINGLE_NAME} in {str(self.path)!r}")
        self._handles: dict[str, object] = {}
        self.read_keys: list[str] = []
        self.read_rows: dict[str, list[int]] = {}

    def _handle(self, key: str):
        if key not in self.weight_map:
            raise KeyError(f"tensor {key!r} is not in the checkpoint at {str(self.path)!r}")
        name = self.weight_map[key]
        if name not in self._handles:
            file = self.path / name
            if not file.is_file():
                raise ValueError(f"{INDEX_NAME} maps {key!r} to missing file {name!r}")
            self._handles[name] = safe_open(file, framework="pt")
        return self._handles[name]

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The safetensors dtype name from the header ('F32', 'BF16', 'F8_E4M3', ...)."""
        return self._handle(key).get_slice(key).get_dtype()

    def get(self, key: str) -> Tensor:
        self.read_keys.append(key)
        return self._handle(key).get_tensor(key)

    def get_rows(self, key: str, ids: list[int]) -> Tensor:
        """Rows `ids` of `key`'s first dim, reading only them (contiguous runs are read as one slice)."""
        self.read_keys.append(key)
        self.read_rows.setdefault(key, []).extend(ids)
        part = self._handle(key).get_slice(key)
        if not ids:
            return part[0:0]
        runs, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                runs.append(part[ids[start] : ids[i - 1] + 1])
                start = i
        return runs[0] if len(runs) == 1 else torch.cat(runs)


class ShardedWriter:
    """Writes (key, tensor) pairs into shards of at most `max_shard_bytes` (a bigger tensor gets its own shard),
    then `close()` names them `model-0000i-of-0000n.safetensors` and writes the index (or one
    `model.safetensors` when everything fit in one shard)."""

    def __init__(self, path: str | Path, *, max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_bytes = 0

    def add(self, key: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, items: Iterable[tuple[str, Tensor]]) -> None:
        for key, tensor in items:
            self.add(key, tensor)

    def _flush(self) -> None:
        name = f"tmp-shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.path / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish the checkpoint; returns the file names written."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            os.replace(self.path / self._shards[0][0], self.path / SINGLE_NAME)
            (self.path / INDEX_NAME).unlink(missing_ok=True)
            return [SINGLE_NAME]
        n, weight_map, names = len(self._shards), {}, []
        for i, (tmp, keys) in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.path / tmp, self.path / name)
            weight_map.update(dict.fromkeys(keys, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX_NAME]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '200KB', '10MiB'."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, mult in (
        ("GIB", 2**30),
        ("MIB", 2**20),
        ("KIB", 2**10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
    ):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    if text.endswith("B"):
        text = text[:-1]
    try:
        return int(text)
    except ValueError as err:
        raise ValueError(f"max_shard_size={size!r} is not a size like 5GB or 200KB") from err

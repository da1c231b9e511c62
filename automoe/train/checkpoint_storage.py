"""Checkpoint storage: JSON files written atomically, RNG state as JSON, and a DCP reader that never unpickles
arbitrary objects (its metadata unpickler allows only DCP's own classes). Used by `automoe.train.checkpoint`."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from automoe.train.faults import NO_FAULTS, FaultHooks


# ---- RNG state as JSON ----
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json(
    path: Path, obj: Any, *, faults: FaultHooks = NO_FAULTS, fault_point: str | None = None, step: int = 0
) -> None:
    """Write, fsync, then rename, so a reader never sees half a file (even after the machine goes down).

    `fault_point`: where `faults` may kill the process with half the temp file written.
    """
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(obj).encode()
    if fault_point is not None:
        faults.at(fault_point, step, damage=lambda: tmp.write_bytes(data[: len(data) // 2]))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint file {path} is corrupt: {e}") from None


@contextlib.contextmanager
def single_process_ok():
    """DCP warns on every call without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` allowing only the classes it is made of (no arbitrary callables)."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
    ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module in self.ALLOWED_MODULES and "." not in name) or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class SafeFileSystemReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata is read by `_MetadataUnpickler` (tensors already use weights_only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or hostile: all reported with the file
            raise ValueError(f"checkpoint file {path} is corrupt or not a DCP metadata file: {e}") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"checkpoint file {path} holds {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class FaultPointWriter(dcp.FileSystemWriter):
    """`FileSystemWriter` that passes `faults` the DCP-internal points of `SAVE_POINTS` (no-ops by default)."""

    def __init__(self, path: str, *, step: int, faults: FaultHooks = NO_FAULTS) -> None:
        super().__init__(path)
        self.step, self.faults = step, faults

    def write_data(self, plan: Any, planner: Any) -> Any:
        self.faults.at("dcp.before_data", self.step)
        result = super().write_data(plan, planner)
        self.faults.at("dcp.data_partial", self.step, damage=lambda: self._truncate_shards(plan))
        self.faults.at("dcp.after_data", self.step)
        return result

    def _truncate_shards(self, plan: Any) -> None:
        for shard in Path(self.path).glob(f"{plan.storage_data.prefix}*"):
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size // 2)

    def finish(self, metadata: Metadata, results: Any) -> None:
        self.faults.at("dcp.before_metadata", self.step)
        super().finish(metadata, results)
        self.faults.at("dcp.after_metadata", self.step)


def check_shard_files(path: Path, metadata: Metadata) -> None:
    """Every shard file the metadata points at exists and is long enough (a truncated file is named here)."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise ValueError(f"checkpoint file {shard} is missing (listed in {path / '.metadata'})")
        actual = shard.stat().st_size
        if actual < size:
            raise ValueError(
                f"checkpoint file {shard} is truncated: {actual} bytes, its metadata needs at least {size}"
            )


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the marker must not survive a power loss that its files did not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

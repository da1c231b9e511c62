"""Small tensor helpers model, parallel and checkpoint code share: the torch dtype a config names, and the local
view of a tensor that a parallelism may have sharded (a DTensor)."""

from __future__ import annotations

from typing import TypeVar

import torch

T = TypeVar("T")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config spells as `name` ("float32", "bfloat16", ...)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype")
    return dtype


def is_sharded(t: object) -> bool:
    """True for a DTensor (a parameter that EP or FSDP sharded).

    Duck-typed, and only here: model code must not import torch.distributed (tests/unit/test_import_boundaries.py),
    and an attribute check, unlike `isinstance` against a lazily looked-up class, traces in torch.compile.
    """
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def local_view(t: T) -> T:
    """This rank's shard of a DTensor (`to_local()`: a view, no communication); anything else (None too) as is."""
    return t.to_local() if is_sharded(t) else t

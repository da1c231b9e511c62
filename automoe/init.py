"""Layout-invariant parameter initialization.

`init_tensor_` fills a parameter as if it were the whole unsharded tensor, drawing from the CPU RNG in a fixed
order, so a model initializes to the same values on one process and under any EP / FSDP layout. Sharded tensors
(DTensors) are written through an assign hook that `apply_ep` / `apply_fsdp` install; model code never imports
torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from automoe.tensors import is_sharded

Fill = Callable[[Tensor], object]
_sharded_assign: Callable[[Tensor, Tensor], None] | None = None


def register_sharded_assign(fn: Callable[[Tensor, Tensor], None]) -> None:
    """Install `fn(sharded, full)` that copies this rank's part of `full` into the sharded tensor."""
    global _sharded_assign
    _sharded_assign = fn


@torch.no_grad()
def init_tensor_(t: Tensor, fill: Fill) -> Tensor:
    """Initialize `t` in place with `fill(full)` applied to a full-size CPU tensor (the same on every layout)."""
    full = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    fill(full)
    if is_sharded(t):  # copy only the local shard
        if _sharded_assign is None:
            raise RuntimeError(
                "a sharded tensor needs the assign hook that automoe.parallel's apply_ep / apply_fsdp install"
            )
        _sharded_assign(t, full)
    else:
        t.copy_(full.to(t.device))
    return t


def trunc_normal_(t: Tensor, *, std: float) -> Tensor:
    """Truncated normal N(0, std^2) cut at +-3 std, layout-invariant."""
    return init_tensor_(t, lambda full: torch.nn.init.trunc_normal_(full, std=std, a=-3 * std, b=3 * std))


def zeros_(t: Tensor) -> Tensor:
    return init_tensor_(t, torch.nn.init.zeros_)


def ones_(t: Tensor) -> Tensor:
    return init_tensor_(t, torch.nn.init.ones_)


def normal_(t: Tensor, *, std: float) -> Tensor:
    """N(0, std^2), layout-invariant."""
    return init_tensor_(t, lambda full: torch.nn.init.normal_(full, mean=0.0, std=std))

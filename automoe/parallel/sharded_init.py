"""The hook through which `automoe.init` writes layout-invariant initial values into sharded (DTensor) tensors.

`apply_ep` and `apply_fsdp`, the two steps that turn parameters into DTensors, install it.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from automoe.init import register_sharded_assign


def assign_shard(sharded: DTensor, full: Tensor) -> None:
    """Copy this rank's part of the full-size tensor `full` into `sharded` (no communication)."""
    local = distribute_tensor(
        full.to(sharded.device), sharded.device_mesh, sharded.placements, src_data_rank=None
    )
    sharded.to_local().copy_(local.to_local())


def install_sharded_init() -> None:
    """Let `init_weights()` fill DTensors: each rank writes its shard of the full initial tensor."""
    register_sharded_assign(assign_shard)

"""Context parallelism: sequence sharding (zigzag load balance), the attention K/V gather (`apply_cp` installs it)
and the CP-aware statistics reducer that makes a sequence split over CP ranks count as one sequence.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor, nn

from automoe.config.checks import check_sequence_split
from automoe.parallel import flight_recorder
from automoe.parallel.dims import ParallelDims

logger = logging.getLogger(__name__)


def cp_positions(seq_len: int, *, cp_rank: int, cp: int, load_balance: bool, device=None) -> Tensor:
    """Global positions [S/cp] this CP rank holds. Zigzag: chunks r and 2cp-1-r of 2cp equal chunks."""
    check_sequence_split(seq_len, cp, zigzag=load_balance)
    if load_balance:
        chunk = seq_len // (2 * cp)
        first, second = cp_rank, 2 * cp - 1 - cp_rank
        return torch.cat(
            [
                torch.arange(first * chunk, (first + 1) * chunk, device=device),
                torch.arange(second * chunk, (second + 1) * chunk, device=device),
            ]
        )
    chunk = seq_len // cp
    return torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)


def shard_sequence(batch: dict, *, cp_rank: int, cp: int, load_balance: bool) -> dict:
    """This CP rank's part of every [B, S] tensor in `batch`; `positions` [B, S_local] are the batch's own when
    it has them (restarting per document, `automoe.data.documents`), else the global indices."""
    tokens = batch["input_ids"]
    B, S = tokens.shape
    pos_S = cp_positions(S, cp_rank=cp_rank, cp=cp, load_balance=load_balance, device=tokens.device)
    out = {
        k: (v.index_select(1, pos_S) if torch.is_tensor(v) and v.dim() == 2 and v.shape == (B, S) else v)
        for k, v in batch.items()
    }
    if "positions" not in batch:
        out["positions"] = pos_S.unsqueeze(0).expand(B, -1)
    return out


class CPKVGather:
    """All-gathers K/V (after RoPE) and their positions from every CP rank, in rank order.

    Backward of the K/V gather is a reduce-scatter (sum) of the gradients: each rank gets the gradient that every
    rank's queries put on its keys and values.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, k_BGSA: Tensor, v_BGSA: Tensor, positions_BS: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flight_recorder.record("all_gather (K, V, positions)", self.group, k_BGSA, v_BGSA, positions_BS)
        k_all = fc.all_gather_tensor_autograd(k_BGSA.contiguous(), gather_dim=2, group=self.group)
        v_all = fc.all_gather_tensor_autograd(v_BGSA.contiguous(), gather_dim=2, group=self.group)
        pos_all = fc.all_gather_tensor(positions_BS.contiguous(), gather_dim=1, group=self.group)
        return fc.wait_tensor(k_all), fc.wait_tensor(v_all), fc.wait_tensor(pos_all)


def apply_cp(model: nn.Module, dims: ParallelDims) -> None:
    """Attention gathers K/V over the CP group (routing statistics: `DistributedStatsReducer`)."""
    group = dims.cp_mesh.get_group()
    for block in model.layers.values():
        block.attention.kv_gather = CPKVGather(group)
    logger.info("applied context parallelism: cp=%d", dims.cp)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; backward sums the gradients over the same group (the derivative of sum_r loss_r)."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = t.clone()
        with flight_recorder.collective("all_reduce (statistics)", group, out):
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        with flight_recorder.collective("all_reduce (statistics backward)", ctx.group, grad):
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


class DistributedStatsReducer:
    """Routing-statistics reducer: CP group for per-sequence sums, every data rank for global-batch sums."""

    def __init__(
        self, *, sequence_group: dist.ProcessGroup | None, batch_group: dist.ProcessGroup | None
    ) -> None:
        self.sequence_group = sequence_group
        self.batch_group = batch_group

    def sum_over_sequence(self, t: Tensor) -> Tensor:
        if self.sequence_group is None:
            return t
        return _AllReduceSum.apply(t, self.sequence_group)

    def sum_over_batch(self, t: Tensor) -> Tensor:
        if self.batch_group is None:
            return t
        out = t.detach().clone()
        with flight_recorder.collective("all_reduce (batch statistics)", self.batch_group, out):
            dist.all_reduce(out, group=self.batch_group)
        return out

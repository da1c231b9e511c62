"""Expert parallelism: the all-to-all token dispatcher and `apply_ep`, which shards experts over the `ep` axis.

Shape suffixes: docs/architecture.md#shape-legend (M pairs sent, Y rows received, X ranks of the ep group).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from automoe.config.checks import check_experts_split
from automoe.moe.index import expand_received, rank_pairs
from automoe.moe.layer import moe_layers
from automoe.moe.permute import expand_rows, weighted_collapse
from automoe.parallel import flight_recorder
from automoe.parallel.sharded_init import install_sharded_init

logger = logging.getLogger(__name__)


@dataclass
class A2AContext:
    pair_slot_M: Tensor  # slot (token * X + destination rank) of every pair sent
    send_splits: list[int]  # pairs sent to each rank
    recv_splits: list[int]  # rows received from each rank
    slot_N: Tensor  # (received row * K + k) slot of each local expert row
    w_YK: Tensor  # routing weights of the received rows' slots (0 where the slot is another rank's)
    num_ranks: int
    num_tokens: int


@dataclass
class WireStats:
    """Rows of the last dispatch: pairs sent (after dedup), and what one copy per expert slot would have sent."""

    rows_sent: int = 0
    rows_remote: int = 0
    slots_remote: Tensor | int = (
        0  # a 0-d tensor: reading it as int is left to the caller (no host sync here)
    )


def _a2a(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Variable-size all_to_all_single with autograd: its backward is the reverse all-to-all of the grads."""
    flight_recorder.record(
        "all_to_all_single (autograd)", group, x, send_splits=in_splits, recv_splits=out_splits
    )
    return fc.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


class AllToAllDispatcher:
    """Sends each token once to every ep rank that owns one of its experts, runs local experts, and returns it.

    The receiving rank expands a token to its local experts, and applies and sums their routing weights before
    the return trip, so the reply is also one row per (token, rank) pair.
    """

    def __init__(self, *, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.experts_per_rank = num_experts // self.num_ranks
        self.wire = WireStats()

    def dispatch(
        self, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, valid_TK: Tensor | None
    ) -> tuple[Tensor, Tensor, A2AContext]:
        T, K = indices_TK.shape
        # 1) unique (token, rank) pairs, sorted by destination rank
        token_M, dest_M, counts_X, local_MK, hit_MK = rank_pairs(
            indices_TK, valid_TK, experts_per_rank=self.experts_per_rank, num_ranks=self.num_ranks
        )
        pair_slot_M = token_M * self.num_ranks + dest_M
        # 2) exchange pair counts (one int per peer: an even all-to-all)
        recv_counts_X = torch.empty_like(counts_X)
        with flight_recorder.collective("all_to_all_single", self.group, counts_X):
            dist.all_to_all_single(recv_counts_X, counts_X, group=self.group)
        # NOTE: host sync: split sizes must be Python ints for the variable-size all-to-all.
        send_splits, recv_splits = counts_X.tolist(), recv_counts_X.tolist()
        self._count_wire(send_splits, hit_MK)
        # 3) tokens, their local expert ids and their weights travel together (weights with autograd)
        x_MD = expand_rows(x_TD, pair_slot_M, slots_per_row=self.num_ranks)
        x_YD = _a2a(x_MD, recv_splits, send_splits, self.group)
        local_YK = torch.empty(sum(recv_splits), K, dtype=local_MK.dtype, device=local_MK.device)
        with flight_recorder.collective("all_to_all_single", self.group, local_MK, send_splits=send_splits):
            dist.all_to_all_single(
                local_YK, local_MK.contiguous(), recv_splits, send_splits, group=self.group
            )
        w_MK = expand_rows(weights_TK, pair_slot_M, slots_per_row=self.num_ranks) * hit_MK
        w_YK = _a2a(w_MK, recv_splits, send_splits, self.group)
        # 4) expand received rows to local-expert-major slots
        slot_N, _, counts_E = expand_received(local_YK, self.experts_per_rank)
        x_ND = expand_rows(x_YD, slot_N, slots_per_row=K)
        ctx = A2AContext(pair_slot_M, send_splits, recv_splits, slot_N, w_YK, self.num_ranks, T)
        return x_ND, counts_E, ctx

    def combine(self, y_ND: Tensor, ctx: A2AContext) -> Tensor:
        # 5) weight and sum each received row's local expert outputs
        y_YD = weighted_collapse(y_ND, ctx.slot_N, ctx.w_YK)
        # 6) return trip (splits swapped), then sum each token's pairs
        y_MD = _a2a(y_YD, ctx.send_splits, ctx.recv_splits, self.group)
        num_tokens = ctx.num_tokens
        ones_TX = y_MD.new_ones(num_tokens, ctx.num_ranks)
        return weighted_collapse(y_MD, ctx.pair_slot_M, ones_TX)

    def _count_wire(self, send_splits: list[int], hit_MK: Tensor) -> None:
        lo = sum(send_splits[: self.rank])
        hi = lo + send_splits[self.rank]
        rows = sum(send_splits)
        self.wire = WireStats(
            rows_sent=rows,
            rows_remote=rows - (hi - lo),
            slots_remote=hit_MK.sum() - hit_MK[lo:hi].sum(),
        )


def _shard_param(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    param = getattr(module, name)
    # Every rank holds the same full tensor (layout-invariant init), so each keeps its slice: no scatter.
    local = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
    sharded = nn.Parameter(local, requires_grad=param.requires_grad)
    setattr(module, name, sharded)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's expert weights `Shard(0)` over `ep_mesh` and swap in the all-to-all dispatcher.

    Expert parameters become DTensors, so distributed checkpoints can be resharded to another EP size.
    """
    install_sharded_init()
    num_ranks = ep_mesh.size()
    for name, layer in moe_layers(model):
        check_experts_split(layer.num_experts, num_ranks, where=name)
        for pname, _ in list(layer.experts.named_parameters(recurse=False)):
            _shard_param(layer.experts, pname, ep_mesh)
        layer.dispatcher = AllToAllDispatcher(num_experts=layer.num_experts, group=ep_mesh.get_group())
    logger.info(
        "applied expert parallelism: ep=%d, %d experts per rank",
        num_ranks,
        next((m.num_experts // num_ranks for _, m in moe_layers(model)), 0),
    )

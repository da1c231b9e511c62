"""Pure index math for routing: counts per expert, sort by expert, permute / unpermute.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flat_slots(indices_TK: Tensor, valid_TK: Tensor | None, num_experts: int) -> Tensor:
    """Expert id of every slot, flattened to [T*K]; invalid (masked or dropped) slots get id `num_experts`."""
    idx_N = indices_TK.reshape(-1)
    if valid_TK is not None:
        idx_N = torch.where(valid_TK.reshape(-1), idx_N, torch.full_like(idx_N, num_experts))
    return idx_N


def sort_by_expert(idx_N: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable expert-major order of the slots and per-expert counts.

    Returns `order_N` (slot positions sorted by expert, invalid slots last) and `counts_E` (int64).
    Slots of one expert keep their token order, so the result is deterministic.
    """
    order_N = torch.argsort(idx_N, stable=True)
    counts_E = torch.bincount(idx_N, minlength=num_experts + 1)[:num_experts]
    return order_N, counts_E


def expert_offsets(counts_E: Tensor) -> Tensor:
    """int32 cumulative end offsets, the `offs` argument of grouped GEMMs."""
    return torch.cumsum(counts_E, dim=0).to(torch.int32)


def count_per_expert(indices_TK: Tensor, valid_T: Tensor | None, num_experts: int) -> Tensor:
    """Top-k slots routed to each expert over valid tokens, as int64 [E] (the load L_e, exact)."""
    idx = indices_TK if valid_T is None else indices_TK[valid_T]
    return torch.bincount(idx.reshape(-1), minlength=num_experts)


def capacity_keep_mask(
    indices_TK: Tensor, weights_TK: Tensor, valid_T: Tensor | None, num_experts: int, capacity: int
) -> Tensor:
    """Boolean [T, K]: which slots fit in `capacity` per expert, keeping the highest weights.

    Ties break by slot position (earlier tokens first), so the result is deterministic.
    """
    T, K = indices_TK.shape
    valid_TK = (
        torch.ones_like(indices_TK, dtype=torch.bool) if valid_T is None else valid_T[:, None].expand(T, K)
    )
    idx_N = flat_slots(indices_TK, valid_TK, num_experts)
    w_N = weights_TK.detach().reshape(-1).float()
    # 1) order slots by (expert, weight descending, position) with two stable sorts
    by_weight = torch.argsort(-w_N, stable=True)
    order = by_weight[torch.argsort(idx_N[by_weight], stable=True)]
    # 2) rank of each slot within its expert
    counts = torch.bincount(idx_N, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(idx_N.numel(), device=idx_N.device) - starts[idx_N[order]]
    rank_N = torch.empty_like(rank_sorted)
    rank_N[order] = rank_sorted
    keep_N = (rank_N < capacity) & (idx_N < num_experts)
    return keep_N.view(T, K)


def rank_pairs(
    indices_TK: Tensor, valid_TK: Tensor | None, *, experts_per_rank: int, num_ranks: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Unique (token, destination rank) pairs for expert-parallel dispatch, sorted by rank then token.

    A token whose K experts include several on one rank yields ONE pair for that rank, so it crosses the wire
    once. Returns `token_M`, `dest_M`, `counts_X` (pairs per rank, int64), `local_MK` (local expert id on the
    pair's rank for each of the token's slots, -1 where the slot goes elsewhere or is invalid) and `hit_MK` (bool
    form of `local_MK >= 0`). M is the number of pairs.
    """
    T, K = indices_TK.shape
    dest_TK = torch.div(indices_TK, experts_per_rank, rounding_mode="floor")
    valid_TK = torch.ones_like(indices_TK, dtype=torch.bool) if valid_TK is None else valid_TK
    hit_TX = torch.zeros(T, num_ranks, dtype=torch.bool, device=indices_TK.device)
    hit_TX[torch.arange(T, device=indices_TK.device)[:, None].expand(T, K)[valid_TK], dest_TK[valid_TK]] = (
        True
    )
    # NOTE: host sync: nonzero sizes its output from the data.
    dest_M, token_M = hit_TX.t().nonzero(as_tuple=True)
    counts_X = hit_TX.sum(0)
    hit_MK = (dest_TK[token_M] == dest_M[:, None]) & valid_TK[token_M]
    local_MK = torch.where(
        hit_MK, indices_TK[token_M] % experts_per_rank, torch.full_like(hit_MK, -1, dtype=torch.long)
    )
    return token_M, dest_M, counts_X, local_MK, hit_MK


def expand_received(local_YK: Tensor, num_local_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Expand received rows into (row, local expert) slots in local-expert-major order.

    Returns `slot_N` (flat index into the [Y, K] slot grid, ordered by local expert then row), `row_N`
    (the received row of each slot) and `counts_E` (slots per local expert, int64).
    """
    Y, K = local_YK.shape
    key_N = torch.where(local_YK >= 0, local_YK, num_local_experts).reshape(-1)
    order_N, counts_E = sort_by_expert(key_N, num_local_experts)
    # NOTE: host sync: how many slots are real decides the row count.
    slot_N = order_N[: int(counts_E.sum())]
    row_N = torch.div(slot_N, K, rounding_mode="floor")
    return slot_N, row_N, counts_E

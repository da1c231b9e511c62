"""Row permutations between a [T, K] slot grid and expert-major rows, with gather-only backward passes.

`index_add` (the autograd backward of `index_select`) serializes on CPU: 8192 x 512 fp32 rows take ~85 ms where a
permuted copy takes ~16 ms and a gather ~8 ms. Because every slot maps to at most one row, both directions can be
written as copies and gathers. Shape suffixes: docs/architecture.md#shape-legend; N <= T*K. The helpers are
generic in their rows and slots: the expert-parallel dispatcher also runs them over received rows (Y) and over
(token, rank) pairs (K = X slots per token).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _slot_grid(rows_ND: Tensor, slot_N: Tensor, num_slots: int) -> Tensor:
    """[num_slots, D]: row n at slot slot_N[n], zeros elsewhere. Slots are distinct, so when every slot has a row
    (dropless) no zero-fill pass is needed."""
    shape = (num_slots, rows_ND.shape[-1])
    grid = rows_ND.new_empty(shape) if slot_N.shape[0] == num_slots else rows_ND.new_zeros(shape)
    return grid.index_copy_(0, slot_N, rows_ND)


class _ExpandRows(torch.autograd.Function):
    """x_ND[n] = x_TD[slot_N[n] // K]; backward sums each row's slot gradients (copy + sum over K)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, slot_N: Tensor, K: int) -> Tensor:
        ctx.save_for_backward(slot_N)
        ctx.K, ctx.num_rows, ctx.x_dtype = K, x_TD.shape[0], x_TD.dtype
        return x_TD.index_select(0, torch.div(slot_N, K, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (slot_N,) = ctx.saved_tensors
        T, K = ctx.num_rows, ctx.K
        grad_ND = grad_ND.to(ctx.x_dtype)
        grad_slots = _slot_grid(grad_ND, slot_N, T * K)
        return grad_slots.view(T, K, grad_ND.shape[-1]).sum(1), None, None


class _WeightedCollapse(torch.autograd.Function):
    """y_TD[t] = sum_k w_TK[t, k] * y_ND[row of slot (t, k)] (0 for empty slots); backward uses gathers only."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, slot_N: Tensor, w_TK: Tensor) -> Tensor:
        T, K = w_TK.shape
        D = y_ND.shape[-1]
        y_TKD = _slot_grid(y_ND, slot_N, T * K).view(T, K, D)
        ctx.w_dtype = w_TK.dtype
        w_TK = w_TK.to(y_ND.dtype)
        ctx.save_for_backward(slot_N, w_TK, y_TKD)
        return torch.bmm(w_TK.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        slot_N, w_TK, y_TKD = ctx.saved_tensors
        grad_TD = grad_TD.to(y_TKD.dtype)  # under autocast the incoming gradient may be fp32
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_TKD = grad_TD.unsqueeze(1) * w_TK.unsqueeze(-1)
            grad_y = grad_TKD.view(-1, grad_TD.shape[-1]).index_select(0, slot_N)
        if ctx.needs_input_grad[2]:
            grad_w = torch.bmm(y_TKD, grad_TD.unsqueeze(-1)).squeeze(-1).to(ctx.w_dtype)
        return grad_y, None, grad_w


def expand_rows(x_TD: Tensor, slot_N: Tensor, *, slots_per_row: int) -> Tensor:
    """[N, D] rows: row n is x_TD[slot_N[n] // slots_per_row]."""
    return _ExpandRows.apply(x_TD, slot_N, slots_per_row)


def weighted_collapse(y_ND: Tensor, slot_N: Tensor, w_TK: Tensor) -> Tensor:
    """[T, D]: each row's weighted sum of its slots' outputs; slots absent from `slot_N` contribute 0."""
    return _WeightedCollapse.apply(y_ND, slot_N, w_TK)

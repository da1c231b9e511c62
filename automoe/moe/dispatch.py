"""Single-process token dispatch: permute token copies into expert-major order and back.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from automoe.moe.index import flat_slots, sort_by_expert
from automoe.moe.permute import expand_rows, weighted_collapse


@dataclass
class LocalDispatchContext:
    slot_N: Tensor  # [T*K] slot of every routed row, in expert-major order
    weights_TK: Tensor  # routing weights (any dropped slot simply has no row)


class LocalDispatcher:
    """All experts live in this process: dispatch permutes token copies, combine takes the weighted sum."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, valid_TK: Tensor | None
    ) -> tuple[Tensor, Tensor, LocalDispatchContext]:
        K = indices_TK.shape[1]
        idx_N = flat_slots(indices_TK, valid_TK, self.num_experts)
        order_N, counts_E = sort_by_expert(idx_N, self.num_experts)
        if valid_TK is not None:
            # NOTE: host sync: how many slots survive masking / capacity decides the row count.
            order_N = order_N[: int(counts_E.sum())]
        x_ND = expand_rows(x_TD, order_N, slots_per_row=K)
        return x_ND, counts_E, LocalDispatchContext(order_N, weights_TK)

    def combine(self, y_ND: Tensor, ctx: LocalDispatchContext) -> Tensor:
        return weighted_collapse(y_ND, ctx.slot_N, ctx.weights_TK)

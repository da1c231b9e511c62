"""Single-process token dispatch: permute token copies into expert-major order and back.

Letters: T tokens, K slots per token, N routed rows, E experts, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from automoe.moe.index import flat_slots, sort_by_expert


@dataclass
class LocalDispatchContext:
    token_N: Tensor  # source token of every routed row
    weights_N: Tensor  # routing weight of every routed row
    num_tokens: int


class LocalDispatcher:
    """All experts live in this process: dispatch is a gather, combine a weighted index_add."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor,
                 valid_TK: Tensor | None) -> tuple[Tensor, Tensor, LocalDispatchContext]:
        T, K = indices_TK.shape
        idx_N = flat_slots(indices_TK, valid_TK, self.num_experts)
        order_N, counts_E = sort_by_expert(idx_N, self.num_experts)
        if valid_TK is not None:
            # NOTE: host sync: how many slots survive masking / capacity decides the row count.
            order_N = order_N[: int(counts_E.sum())]
        token_N = torch.div(order_N, K, rounding_mode="floor")
        x_ND = x_TD.index_select(0, token_N)
        weights_N = weights_TK.reshape(-1).index_select(0, order_N)
        return x_ND, counts_E, LocalDispatchContext(token_N, weights_N, T)

    def combine(self, y_ND: Tensor, ctx: LocalDispatchContext) -> Tensor:
        weighted_ND = y_ND * ctx.weights_N.to(y_ND.dtype).unsqueeze(-1)
        out_TD = y_ND.new_zeros(ctx.num_tokens, y_ND.shape[-1])
        return out_TD.index_add(0, ctx.token_N, weighted_ND)

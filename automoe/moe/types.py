"""Seams of the MoE layer: router output, token dispatcher and statistics reducer protocols.

Letters: T tokens, K slots per token, N routed rows (token copies), E experts, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor


@dataclass
class RouterOutput:
    """What a gate hands the MoE layer for T flattened tokens."""

    weights_TK: Tensor  # combine weight of each selected expert (route_scale applied)
    indices_TK: Tensor  # int64 global expert id of each slot
    probs_TE: Tensor | None = None  # full score distribution P (for the balancing loss), differentiable
    logits_TE: Tensor | None = None  # raw router logits (for the z-loss)
    gate_loss: Tensor | None = None  # a gate's own scalar loss (noisy_topk cv^2), already weighted


class TokenDispatcher(Protocol):
    """Moves token copies to the experts that own them and back.

    `dispatch` returns rows in local-expert-major order with per-local-expert counts;
    `combine` inverts it and applies the routing weights. Both are autograd-transparent.
    """

    def dispatch(self, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor,
                 valid_TK: Tensor | None) -> tuple[Tensor, Tensor, Any]:
        """-> (x_ND rows for the local experts, counts_E int64 per local expert, ctx for combine)."""
        ...

    def combine(self, y_ND: Tensor, ctx: Any) -> Tensor:
        """-> y_TD: each token's routing-weighted sum of its experts' outputs (zeros for unrouted tokens)."""
        ...


class StatsReducer(Protocol):
    """Sums routing statistics over ranks that hold parts of the same data.

    Identity on one process; under context parallelism it all-reduces over the CP group.
    """

    def sum_over_sequence(self, t: Tensor) -> Tensor:
        """Differentiable sum over ranks that hold pieces of the same sequences (the CP group)."""
        ...

    def sum_over_batch(self, t: Tensor) -> Tensor:
        """Sum without gradient over every rank that sees different data (DP x CP): global-batch statistics."""
        ...


class IdentityReducer:
    """The single-process reducer: every statistic is already complete."""

    def sum_over_sequence(self, t: Tensor) -> Tensor:
        return t

    def sum_over_batch(self, t: Tensor) -> Tensor:
        return t

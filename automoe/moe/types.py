"""Seams of the MoE layer: router output, gate, token dispatcher and statistics reducer protocols.

Shape suffixes: docs/architecture.md#shape-legend.
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


class Gate(Protocol):
    """A router. Registered with `automoe.config.gates.register_gate`, whose `GateSpec` declares which of the
    optional `RouterOutput` fields it fills (probs_TE for the aux loss, logits_TE for the z-loss, gate_loss)."""

    num_experts: int
    top_k: int  # K slots per token in `indices_TK`

    def __call__(self, x_TD: Tensor, valid_T: Tensor | None) -> RouterOutput:
        """Route T tokens x_TD [T, D]; `valid_T` [T] bool is False at padding (left out of any gate loss)."""
        ...

    def init_weights(self, *, std: float) -> None: ...


class BiasedGate(Gate, Protocol):
    """A gate whose spec declares `selection_bias`: a per-expert bias added to the scores for selection only."""

    def update_bias(self, delta_E: Tensor) -> None:
        """bias_E += delta_E, after the optimizer step (`automoe.moe.balance.update_gate_biases`)."""
        ...


class TokenDispatcher(Protocol):
    """Moves token copies to the experts that own them and back.

    `dispatch` returns rows in local-expert-major order with per-local-expert counts;
    `combine` inverts it and applies the routing weights. Both are autograd-transparent.
    """

    def dispatch(
        self, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, valid_TK: Tensor | None
    ) -> tuple[Tensor, Tensor, Any]:
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

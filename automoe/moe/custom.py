"""Build an MoE layer from user modules: a list of expert `nn.Module`s and a gate producing logits.

This path runs the experts in a Python loop (any module mapping [n, D] -> [n, D] works); it trades speed for
freedom. Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from automoe.config.moe import MoEConfig
from automoe.moe.layer import MoE
from automoe.moe.types import RouterOutput


class ModuleListExperts(nn.Module):
    """Arbitrary expert modules behind the grouped-experts interface `forward(x_ND, counts_E) -> y_ND`."""

    def __init__(self, experts: list[nn.Module]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        # NOTE: host sync: the loop needs Python row counts.
        chunks = torch.split(x_ND, counts_E.tolist())
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])

    def init_weights(self, **_: object) -> None:
        """User modules keep their own initialization."""


class LogitsGate(nn.Module):
    """Wraps a module producing router logits [T, E]: softmax over E, top-k, renormalize over the K."""

    def __init__(self, logits: nn.Module, *, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.logits = logits
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x_TD: Tensor, valid_T: Tensor | None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        weights_TK, indices_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return RouterOutput(weights_TK.to(x_TD.dtype), indices_TK, probs_TE=probs_TE, logits_TE=logits_TE)

    def init_weights(self, **_: object) -> None:
        """User modules keep their own initialization."""


def moe_from_modules(
    experts: list[nn.Module], gate: nn.Module, *, top_k: int, dim: int, aux_loss_coeff: float = 0.0
) -> MoE:
    """An MoE layer over user-supplied experts and a logits-producing gate (textbook top-k MoE)."""
    if not 1 <= top_k <= len(experts):
        raise ValueError(f"top_k={top_k} must be in [1, number of experts={len(experts)}]")
    cfg = MoEConfig(
        dim=dim,
        num_experts=len(experts),
        num_activated_experts=top_k,
        aux_loss_coeff=aux_loss_coeff,
        experts_backend="loop",
    )
    routed_gate = LogitsGate(gate, num_experts=len(experts), top_k=top_k)
    return MoE(cfg, gate=routed_gate, experts=ModuleListExperts(experts))

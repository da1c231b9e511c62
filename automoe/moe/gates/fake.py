"""`FakeBalancedGate` (`gate="fake_balanced"`): routing that ignores the input, for performance experiments.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from automoe.config.moe import MoEConfig
from automoe.moe.types import RouterOutput


class FakeBalancedGate(nn.Module):
    """Assigns tokens to experts without looking at them; has no parameters.

    `noise = 0`: the valid tokens' slots go round-robin over the allowed experts
    (`fake_gate_skip_first_n_experts` onwards), so each token gets K distinct experts, every
    expert gets the same load when (valid tokens * K) is a multiple of the number of allowed experts, and
    weights are 1/K.
    `noise in (0, 1]`: each token independently, with probability `noise`, gets K random distinct
    allowed experts instead; weights are `(1 - noise)/K + noise * softmax(randn_K)`. `noise = 1`
    is fully random. Randomness comes from the global torch RNG (activation checkpointing
    restores it, so a recompute routes identically). Weights are multiplied by `route_scale`.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_activated_experts
        self.skip_first_n_experts = cfg.fake_gate_skip_first_n_experts
        self.noise = cfg.fake_gate_noise
        self.route_scale = cfg.route_scale

    def init_weights(self, *, std: float = 0.02) -> None:
        """Nothing to initialize."""

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> RouterOutput:
        """Route T tokens (only x_TD's shape, device and dtype are read)."""
        T, K, device = x_TD.shape[0], self.top_k, x_TD.device
        num_allowed = self.num_experts - self.skip_first_n_experts
        # position of each token among the valid ones, so padding does not skew the balance
        if valid_T is None:
            pos_T = torch.arange(T, device=device)
        else:
            pos_T = torch.cumsum(valid_T.to(torch.int64), dim=0) - 1
        slot_TK = pos_T.unsqueeze(1) * K + torch.arange(K, device=device)
        indices_TK = slot_TK % num_allowed
        weights_TK = torch.full((T, K), 1.0 / K, device=device)
        if self.noise > 0:
            random_T = torch.rand(T, device=device) < self.noise
            random_idx_TK = torch.rand(T, num_allowed, device=device).topk(K, dim=-1).indices
            indices_TK = torch.where(random_T.unsqueeze(1), random_idx_TK, indices_TK)
            random_w_TK = torch.softmax(torch.randn(T, K, device=device), dim=-1)
            weights_TK = (1.0 - self.noise) * weights_TK + self.noise * random_w_TK
        return RouterOutput(
            weights_TK=(weights_TK * self.route_scale).to(x_TD.dtype),
            indices_TK=indices_TK + self.skip_first_n_experts,
        )

"""`HybridGate` (`gate="hybrid"`): a learned mix of soft, sparse top-k and memory-key routing over all experts.

Shape suffixes: docs/architecture.md#shape-legend (K: slots of the sparse part).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from automoe import init
from automoe.config.moe import MoEConfig
from automoe.moe.gates.topk import param_dtype, router_compute_dtype, router_linear
from automoe.moe.types import RouterOutput

# Initial mix (soft, sparse, memory) = seed 003's fixed one: alpha=0.5 between sparse and soft, then
# averaged with the memory routing. softmax(log(p)) = p, so the learned mix starts exactly there.
INITIAL_MIX = (0.25, 0.25, 0.5)


class HybridGate(nn.Module):
    """Dense routing: every token uses every expert (K = E) with weight

        mix_0 * softmax(x·w_softᵀ) + mix_1 * scatter(softmax(top-K of x·w_sparseᵀ))
        + mix_2 * softmax(x·memory_keysᵀ / sqrt(D)),     mix = softmax(mix_logits)

    Parameters: `w_soft`, `w_sparse`, `memory_keys` [E, D], `mix_logits` [3]; `b_soft`, `b_sparse` [E]
    when `cfg.router_bias`. Each part and so the mix sums to 1 per token; the weights are then
    multiplied by `route_scale`. `indices_TK` is arange(E) for every token; `probs_TE` is the mix;
    `logits_TE` are the soft router's logits.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts  # every expert is computed; the sparse part keeps num_activated_experts
        self.sparse_top_k = cfg.num_activated_experts
        E, D, dtype = cfg.num_experts, cfg.dim, param_dtype(cfg)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=cfg.train_gate)

        self.w_soft, self.w_sparse, self.memory_keys = param(E, D), param(E, D), param(E, D)
        self.b_soft = param(E) if cfg.router_bias else None
        self.b_sparse = param(E) if cfg.router_bias else None
        self.mix_logits = nn.Parameter(torch.empty(3, dtype=torch.float32), requires_grad=cfg.train_gate)

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02) -> None:
        """Router weights and keys ~ N(0, std²), biases 0, mix_logits = log(INITIAL_MIX)."""
        for w in (self.w_soft, self.w_sparse, self.memory_keys):
            init.normal_(w, std=std)
        for b in (self.b_soft, self.b_sparse):
            if b is not None:
                init.zeros_(b)
        self.mix_logits.copy_(torch.tensor(INITIAL_MIX).log())

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> RouterOutput:
        """Mixed routing distribution of T tokens x_TD [T, D]; `valid_T` is unused (no gate loss)."""
        dtype = router_compute_dtype(self.cfg, x_TD)
        logits_TE = router_linear(x_TD, self.w_soft, self.b_soft, dtype)
        soft_TE = torch.softmax(logits_TE, dim=-1)
        sparse_logits_TE = router_linear(x_TD, self.w_sparse, self.b_sparse, dtype)
        top_values_TK, top_indices_TK = sparse_logits_TE.topk(self.sparse_top_k, dim=-1)
        sparse_TE = torch.zeros_like(sparse_logits_TE).scatter(
            1, top_indices_TK, torch.softmax(top_values_TK, -1)
        )
        memory_logits_TE = router_linear(x_TD, self.memory_keys, None, dtype) / math.sqrt(self.cfg.dim)
        memory_TE = torch.softmax(memory_logits_TE, dim=-1)
        mix_3 = torch.softmax(self.mix_logits.to(dtype), dim=0)
        mixed_TE = mix_3[0] * soft_TE + mix_3[1] * sparse_TE + mix_3[2] * memory_TE
        T, E = mixed_TE.shape
        return RouterOutput(
            weights_TK=(mixed_TE * self.cfg.route_scale).to(x_TD.dtype),
            indices_TK=torch.arange(E, device=x_TD.device).expand(T, E),
            probs_TE=mixed_TE,
            logits_TE=logits_TE,
        )

"""`NoisyTopKGate` (`gate="noisy_topk"`): Shazeer et al. 2017 noisy top-k gating with its cv² balancing loss.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init
from automoe.config.moe import MoEConfig
from automoe.moe.gates.topk import param_dtype, router_compute_dtype, router_linear
from automoe.moe.types import RouterOutput

NOISE_EPS = 1e-2  # floor of the learned noise std
CV_EPS = 1e-10  # keeps cv² finite when every entry is 0


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation var/(mean² + eps) (unbiased var); 0 for a single entry."""
    x_E = x_E.float()
    if x_E.numel() == 1:
        return x_E.new_zeros(())
    return x_E.var() / (x_E.mean() ** 2 + CV_EPS)


def prob_in_top_k(
    clean_TE: Tensor, noisy_TE: Tensor, noise_std_TE: Tensor, top_values: Tensor, *, k: int
) -> Tensor:
    """P(expert e is in token t's top-k) when e's noise is redrawn and the other experts' noise is kept.

    e stays in the top k iff its noisy logit beats the k-th largest of the OTHER experts' noisy
    logits: that is the (k+1)-th value overall if e is currently in the top k, else the k-th.
    Differentiable w.r.t. clean logits, noise std and the thresholds (the paper's load estimator).
    `top_values` (T, k+1) holds the k+1 largest noisy logits per token, descending.
    """
    threshold_if_in_T1 = top_values[:, k : k + 1]
    threshold_if_out_T1 = top_values[:, k - 1 : k]
    is_in_TE = noisy_TE > threshold_if_in_T1
    prob_if_in_TE = torch.special.ndtr((clean_TE - threshold_if_in_T1) / noise_std_TE)
    prob_if_out_TE = torch.special.ndtr((clean_TE - threshold_if_out_T1) / noise_std_TE)
    return torch.where(is_in_TE, prob_if_in_TE, prob_if_out_TE)


class NoisyTopKGate(nn.Module):
    """H(x) = x·w_gate + randn · (softplus(x·w_noise) + 1e-2) in training; top-k of H, softmax over the K.

    `gate_loss = aux_loss_coeff * (cv²(importance) + cv²(load))` over valid tokens, where importance_e
    sums the gate values and load_e is the differentiable estimate of how many tokens pick e (training,
    K < E) or the plain count (eval, or K = E). None when `aux_loss_coeff == 0`. In eval no noise is
    added, so routing is deterministic. `probs_TE` = softmax of the clean logits over E.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_activated_experts
        shape, dtype = (cfg.num_experts, cfg.dim), param_dtype(cfg)
        self.w_gate = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=cfg.train_gate)
        self.w_noise = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=cfg.train_gate)

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02) -> None:
        """w_gate ~ N(0, std²); w_noise = 0 (the paper's init: noise std starts at softplus(0) + eps)."""
        init.normal_(self.w_gate, std=std)
        init.zeros_(self.w_noise)

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> RouterOutput:
        """Route T tokens x_TD [T, D]; padding (valid_T False) is left out of the loss."""
        cfg, K, E = self.cfg, self.top_k, self.num_experts
        dtype = router_compute_dtype(cfg, x_TD)
        clean_TE = router_linear(x_TD, self.w_gate, None, dtype)
        noisy = self.training
        if noisy:
            noise_std_TE = F.softplus(router_linear(x_TD, self.w_noise, None, dtype)) + NOISE_EPS
            logits_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        else:
            logits_TE = clean_TE
        top_values, top_indices = logits_TE.topk(
            min(K + 1, E), dim=-1
        )  # (T, K+1): K+1 kept for the load estimate
        indices_TK = top_indices[:, :K]
        gates_TK = torch.softmax(top_values[:, :K], dim=-1)

        gate_loss = None
        if cfg.aux_loss_coeff > 0:
            valid_T1 = torch.ones_like(clean_TE[:, :1]) if valid_T is None else valid_T.to(dtype).unsqueeze(1)
            importance_E = (torch.zeros_like(clean_TE).scatter(1, indices_TK, gates_TK) * valid_T1).sum(0)
            if noisy and K < E:
                load_TE = prob_in_top_k(clean_TE, logits_TE, noise_std_TE, top_values, k=K)
            else:
                load_TE = torch.zeros_like(clean_TE).scatter(1, indices_TK, 1.0)
            load_E = (load_TE * valid_T1).sum(0)
            gate_loss = cfg.aux_loss_coeff * (cv_squared(importance_E) + cv_squared(load_E))
        return RouterOutput(
            weights_TK=(gates_TK * cfg.route_scale).to(x_TD.dtype),
            indices_TK=indices_TK,
            probs_TE=torch.softmax(clean_TE, dim=-1),
            logits_TE=clean_TE,
            gate_loss=gate_loss,
        )

"""The learned top-k router (`gate="topk"`): Mixtral, Qwen3-MoE, DeepSeek-V3 and GPT-OSS routing.

Also the small helpers every learned gate shares (router dtype, router linear).
Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init
from automoe.config.moe import MoEConfig
from automoe.moe.types import RouterOutput
from automoe.tensors import torch_dtype

NORM_EPS = 1e-20  # added to the sum of the K weights before renormalizing (DeepSeek-V3's constant)


def param_dtype(cfg: MoEConfig) -> torch.dtype:
    """The torch dtype named by `cfg.dtype` (parameters of the layer)."""
    return torch_dtype(cfg.dtype)


def router_compute_dtype(cfg: MoEConfig, x_TD: Tensor) -> torch.dtype:
    """dtype of the router math: `cfg.router_dtype`, or the input's dtype when it is None."""
    return x_TD.dtype if cfg.router_dtype is None else torch_dtype(cfg.router_dtype)


def router_linear(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None, dtype: torch.dtype) -> Tensor:
    """logits_TE = x_TD @ weight_ED.T (+ bias_E), with inputs and weights cast to `dtype`."""
    bias = None if bias_E is None else bias_E.to(dtype)
    return F.linear(x_TD.to(dtype), weight_ED.to(dtype), bias)


def group_limited_mask(choice_TE: Tensor, *, num_groups: int, num_kept: int, top2_sum: bool) -> Tensor:
    """Mask out (-inf) every expert outside each token's `num_kept` best groups.

    A group's score is the sum of its two best `choice_TE` entries when `top2_sum` (DeepSeek-V3,
    with a correction bias), else its best entry (DeepSeek-V2). HF DeepSeek-V3 fills with 0.0
    instead of -inf: the same experts whenever the kept groups offer K biased scores > 0, but
    with 0.0 a negative biased score loses to an expert of a dropped group.
    """
    T, E = choice_TE.shape
    grouped = choice_TE.view(T, num_groups, E // num_groups)  # (T, num_groups, I)
    if top2_sum:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, num_groups)
    else:
        group_scores = grouped.amax(dim=-1)
    kept_groups = torch.zeros_like(group_scores, dtype=torch.bool)
    kept_groups.scatter_(1, group_scores.topk(num_kept, dim=-1).indices, True)
    kept_TE = kept_groups.unsqueeze(-1).expand_as(grouped).reshape(T, E)
    return choice_TE.masked_fill(~kept_TE, float("-inf"))


class TopKGate(nn.Module):
    """Linear router + score function + (group-limited) top-k selection.

    Parameters: `weight` [E, D] (logits = x @ weight.T), `bias` [E] when `cfg.router_bias`.
    Buffer: `correction_bias` [E] fp32 when `cfg.has_correction_bias`, added to the scores for
    SELECTION only; the combine weights always come from the unbiased scores.

    Score functions (math in `cfg.router_dtype`, weights returned in the input dtype):
      - softmax, `softmax_before_topk=True`: softmax over E, top-k of the probabilities (Mixtral with
        `norm_topk_prob`, HF's op order; Qwen3-MoE).
      - softmax, `softmax_before_topk=False`: top-k of the logits, softmax over the K (GPT-OSS). The same
        weights as softmax, top-k, renormalize up to rounding.
      - sigmoid: top-k of sigmoid scores (DeepSeek-V3); `probs_TE` are the scores normalized per token.
    Selection (bias, groups, top-k) runs on those scores, i.e. on the logits for top-k-then-softmax;
    slots come sorted by descending selection score. All router math, softmax included, runs in
    `router_dtype` (HF's bf16 Mixtral/Qwen3 instead take a bf16 linear and an fp32 softmax).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_activated_experts
        dtype = param_dtype(cfg)
        self.weight = nn.Parameter(
            torch.empty(cfg.num_experts, cfg.dim, dtype=dtype), requires_grad=cfg.train_gate
        )
        self.bias = (
            nn.Parameter(torch.empty(cfg.num_experts, dtype=dtype), requires_grad=cfg.train_gate)
            if cfg.router_bias
            else None
        )
        if cfg.has_correction_bias:
            self.register_buffer("correction_bias", torch.empty(cfg.num_experts, dtype=torch.float32))
        else:
            self.correction_bias = None

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02) -> None:
        """weight ~ N(0, std²); router bias and correction bias = 0."""
        init.normal_(self.weight, std=std)
        if self.bias is not None:
            init.zeros_(self.bias)
        if self.correction_bias is not None:
            self.correction_bias.zero_()

    def _apply(self, fn, recurse: bool = True):
        """`Module.to(dtype)`, `.bfloat16()` and the like cast every floating tensor; the correction bias is only
        moved: it stays fp32 as in DeepSeek-V3 (in bf16 a gamma = 1e-3 step is rounded away once |b| >= 0.25)."""
        bias = self.correction_bias
        super()._apply(fn, recurse)
        if bias is not None and self.correction_bias.dtype != bias.dtype:
            self._buffers["correction_bias"] = bias.to(device=self.correction_bias.device)
        return self

    @torch.no_grad()
    def update_bias(self, delta_E: Tensor) -> None:
        """correction_bias += delta_E [E] (the aux-loss-free balancing step; `moe.balance` computes delta_E)."""
        self.correction_bias.add_(delta_E.to(self.correction_bias.dtype))

    def _scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """-> (scores_TE the weights are gathered from, probs_TE the full distribution for balancing)."""
        if self.cfg.score_func == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return (probs_TE if self.cfg.softmax_before_topk else logits_TE), probs_TE

    def _select(self, scores_TE: Tensor) -> Tensor:
        """Top-k expert ids [T, K] on the (bias-corrected, group-limited) scores; no gradient."""
        cfg = self.cfg
        choice_TE = scores_TE.detach()
        if self.correction_bias is not None:
            choice_TE = choice_TE + self.correction_bias
        if cfg.num_expert_groups > 1:
            choice_TE = group_limited_mask(
                choice_TE,
                num_groups=cfg.num_expert_groups,
                num_kept=cfg.num_limited_groups,
                top2_sum=self.correction_bias is not None,
            )
        return choice_TE.topk(self.top_k, dim=-1).indices

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> RouterOutput:
        """Route T tokens x_TD [T, D]. `valid_T` is unused: this gate has no loss of its own."""
        cfg = self.cfg
        logits_TE = router_linear(x_TD, self.weight, self.bias, router_compute_dtype(cfg, x_TD))
        scores_TE, probs_TE = self._scores(logits_TE)
        indices_TK = self._select(scores_TE)
        weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.score_func == "softmax" and not cfg.softmax_before_topk:
            weights_TK = torch.softmax(weights_TK, dim=-1)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + NORM_EPS)
        weights_TK = weights_TK * cfg.route_scale
        return RouterOutput(
            weights_TK=weights_TK.to(x_TD.dtype),
            indices_TK=indices_TK,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
        )

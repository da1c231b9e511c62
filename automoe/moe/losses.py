"""Load-balancing losses: Switch/GShard aux loss at three scopes, and the router z-loss.

Shape suffixes: docs/architecture.md#shape-legend.
Every statistic (token count T, load L_e, sum of scores) passes through a `StatsReducer` before the formula,
so a sequence split over context-parallel ranks is treated as one sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from automoe.moe.types import StatsReducer


def _valid_float(valid_T: Tensor | None, T: int, device: torch.device) -> Tensor:
    if valid_T is None:
        return torch.ones(T, device=device, dtype=torch.float32)
    return valid_T.to(torch.float32)


def _load_BE(indices_TK: Tensor, m_T: Tensor, batch: int, num_experts: int) -> Tensor:
    """Per-sequence expert load over valid tokens: [B, E] float32 (no grad)."""
    T, K = indices_TK.shape
    one_hot = torch.zeros(T, num_experts, device=indices_TK.device, dtype=torch.float32)
    one_hot.scatter_add_(1, indices_TK, m_T[:, None].expand(T, K).contiguous())
    return one_hot.view(batch, T // batch, num_experts).sum(1)


def aux_loss(probs_TE: Tensor, indices_TK: Tensor, valid_T: Tensor | None, *, batch: int, scope: str,
             reducer: StatsReducer, global_load_E: Tensor | None = None,
             global_tokens: Tensor | None = None) -> Tensor:
    """Unweighted Switch-style balance loss sum_e f_e * P_e (gradient only through P).

    f_e = L_e * E / (K * T) and P_e = sum_t p_te / T over valid tokens.
    - micro_batch: f, P over this micro-batch (summed over the CP group).
    - sequence: f, P per sequence, then the mean over sequences with at least one valid token.
    - global: f from `global_load_E` / `global_tokens` (load accumulated over the step's micro-batches and
      every data rank), P from this micro-batch.
    """
    T, E = probs_TE.shape
    K = indices_TK.shape[1]
    m_T = _valid_float(valid_T, T, probs_TE.device)
    probs_TE = probs_TE.float() * m_T[:, None]
    with torch.no_grad():
        load_BE = _load_BE(indices_TK, m_T, batch, E)
    if scope == "sequence":
        sum_p_BE = reducer.sum_over_sequence(probs_TE.view(batch, T // batch, E).sum(1))
        load_BE = reducer.sum_over_sequence(load_BE)
        tokens_B = reducer.sum_over_sequence(m_T.view(batch, -1).sum(1))
        has_tokens_B = tokens_B > 0
        denom_B = tokens_B.clamp(min=1.0)[:, None]
        per_seq_B = ((load_BE * E / (K * denom_B)) * (sum_p_BE / denom_B)).sum(1)
        return (per_seq_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1)
    sum_p_E = reducer.sum_over_sequence(probs_TE.sum(0))
    tokens = reducer.sum_over_sequence(m_T.sum())
    p_E = sum_p_E / tokens.clamp(min=1.0)
    if scope == "global":
        if global_load_E is None or global_tokens is None:
            raise ValueError("aux_loss_type='global' needs the step's accumulated load and token count")
        f_E = global_load_E * E / (K * global_tokens.clamp(min=1.0))
    else:
        f_E = reducer.sum_over_sequence(load_BE.sum(0)) * E / (K * tokens.clamp(min=1.0))
    return (f_E * p_E).sum()


def z_loss(logits_TE: Tensor, valid_T: Tensor | None, *, reducer: StatsReducer) -> Tensor:
    """Router z-loss mean_t(logsumexp_e(logits_te))^2 over valid tokens (ST-MoE)."""
    T = logits_TE.shape[0]
    m_T = _valid_float(valid_T, T, logits_TE.device)
    lse_sq_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    total = reducer.sum_over_sequence((lse_sq_T * m_T).sum())
    tokens = reducer.sum_over_sequence(m_T.sum())
    return total / tokens.clamp(min=1.0)

"""Load-balancing losses: Switch/GShard aux loss at three scopes, and the router z-loss.

Shape suffixes: docs/architecture.md#shape-legend.
Every statistic (token count T, load L_e, sum of scores) passes through a `StatsReducer` before the formula,
so a sequence split over context-parallel ranks is treated as one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from automoe.moe.types import StatsReducer

_MICRO_BATCHES, _SEQUENCES, _TOKENS = range(3)  # rows of `StepTotals.per_unit`


@dataclass(frozen=True)
class StepTotals:
    """Counts over one optimizer step, every micro-batch of every data rank (context-parallel ranks share theirs).

    Each loss term is formed per micro-batch and the trainer averages the micro-batch terms over the step's
    `units` (micro-batches x data ranks). Given these totals (`MoE.step_totals`), a micro-batch's term is
    `units` x its share of the step's value, so that mean is the scope's definition on the whole step whatever
    the padding: micro_batch = mean over the step's micro-batches with a valid token; sequence = mean over
    the step's sequences (documents when packed) with a valid token; global and z-loss = mean over the step's
    valid tokens. Without them (a lone forward) the micro-batch is the step.
    """

    units: int  # micro-batches of the step over all data ranks
    micro_batches: int  # of those, the ones holding at least one valid token
    sequences: int  # sequences (rows; (row, document) pairs when packed) holding at least one valid token
    tokens: int  # valid (routed) tokens

    def per_unit(self, device: torch.device | str | None = None) -> Tensor:
        """float32 [3]: micro_batches, sequences, tokens per unit (what a micro-batch's term is divided by)."""
        counts = torch.tensor([self.micro_batches, self.sequences, self.tokens], dtype=torch.float64)
        return (counts.clamp(min=1) / self.units).to(device=device, dtype=torch.float32)


def micro_batch_counts(valid_BS: Tensor, document_ids_BS: Tensor | None = None) -> tuple[int, int, int]:
    """(1 if it holds a valid token else 0, sequences holding one, valid tokens) of one micro-batch [B, S], with
    sequences counted as `aux_loss` counts them: rows, or (row, document) pairs given `document_ids_BS`."""
    tokens = int(valid_BS.sum())
    if document_ids_BS is None:
        sequences = int(valid_BS.any(dim=1).sum())
    else:
        rows_BS = torch.arange(valid_BS.shape[0], device=valid_BS.device)[:, None].expand_as(valid_BS)
        pairs = rows_BS[valid_BS] * (int(document_ids_BS.max()) + 1) + document_ids_BS[valid_BS]
        sequences = int(torch.unique(pairs).numel())
    return int(tokens > 0), sequences, tokens


def _per_unit(step_per_unit: Tensor | None, which: int, local: Tensor | float) -> Tensor | float:
    """The step's count per unit (`which` row of `StepTotals.per_unit`), or this micro-batch's own (`local`)."""
    return local if step_per_unit is None else step_per_unit[which]


def _valid_float(valid_T: Tensor | None, T: int, device: torch.device) -> Tensor:
    if valid_T is None:
        return torch.ones(T, device=device, dtype=torch.float32)
    return valid_T.to(torch.float32)


def _sequence_T(T: int, batch: int, document_T: Tensor | None, num_documents: int, device) -> Tensor | None:
    """[T] index of each token's sequence, a (row, document) pair: None when the rows are the sequences."""
    if document_T is None:
        return None
    return torch.arange(T, device=device) // (T // batch) * num_documents + document_T


def _sum_per_sequence(x_TE: Tensor, batch: int, sequence_T: Tensor | None, num_sequences: int) -> Tensor:
    """[B, E]: x summed over the tokens of each sequence (B = `batch` rows, or `num_sequences` indexed by
    `sequence_T`)."""
    if sequence_T is None:
        return x_TE.view(batch, -1, x_TE.shape[-1]).sum(1)
    return x_TE.new_zeros(num_sequences, x_TE.shape[-1]).index_add(0, sequence_T, x_TE)


def _load_BE(
    indices_TK: Tensor,
    m_T: Tensor,
    batch: int,
    num_experts: int,
    sequence_T: Tensor | None = None,
    num_sequences: int = 0,
) -> Tensor:
    """Per-sequence expert load over valid tokens: [B, E] float32 (no grad)."""
    T, K = indices_TK.shape
    one_hot = torch.zeros(T, num_experts, device=indices_TK.device, dtype=torch.float32)
    one_hot.scatter_add_(1, indices_TK, m_T[:, None].expand(T, K).contiguous())
    return _sum_per_sequence(one_hot, batch, sequence_T, num_sequences)


def aux_loss(
    probs_TE: Tensor,
    indices_TK: Tensor,
    valid_T: Tensor | None,
    *,
    batch: int,
    scope: str,
    reducer: StatsReducer,
    global_load_E: Tensor | None = None,
    global_tokens: Tensor | None = None,
    document_T: Tensor | None = None,
    num_documents: int = 1,
    step_per_unit: Tensor | None = None,
) -> Tensor:
    """Unweighted Switch-style balance loss sum_e f_e * P_e (gradient only through P).

    f_e = L_e * E / (K * T) and P_e = sum_t p_te / T over valid tokens.
    - micro_batch: f, P over this micro-batch (summed over the CP group).
    - sequence: f, P per sequence, then the mean over sequences with at least one valid token. With packed
      documents (`document_T` [T]: each token's document index in its row, < `num_documents`, the same
      count on every CP rank) a sequence is one document of a row.
    - global: f from `global_load_E` / `global_tokens` (load accumulated over the step's micro-batches and
      every data rank), P from this micro-batch.
    `step_per_unit` (`StepTotals.per_unit`, set for a training step of several micro-batches or ranks): the
    micro-batch's share of its scope's mean over the whole step instead (see `StepTotals`).
    """
    T, E = probs_TE.shape
    K = indices_TK.shape[1]
    m_T = _valid_float(valid_T, T, probs_TE.device)
    probs_TE = probs_TE.float() * m_T[:, None]
    # B below: the sequences, `batch` rows or `batch * num_documents` (row, document) pairs
    document_T = document_T if scope == "sequence" else None
    sequence_T = _sequence_T(T, batch, document_T, num_documents, probs_TE.device)
    num_sequences = batch * num_documents
    with torch.no_grad():
        load_BE = _load_BE(indices_TK, m_T, batch, E, sequence_T, num_sequences)
    if scope == "sequence":
        sum_p_BE = reducer.sum_over_sequence(_sum_per_sequence(probs_TE, batch, sequence_T, num_sequences))
        load_BE = reducer.sum_over_sequence(load_BE)
        tokens_B1 = _sum_per_sequence(m_T[:, None], batch, sequence_T, num_sequences)
        tokens_B = reducer.sum_over_sequence(tokens_B1[:, 0])
        has_tokens_B = tokens_B > 0
        denom_B = tokens_B.clamp(min=1.0)[:, None]
        per_seq_B = ((load_BE * E / (K * denom_B)) * (sum_p_BE / denom_B)).sum(1)
        num_seqs = _per_unit(step_per_unit, _SEQUENCES, has_tokens_B.sum().clamp(min=1))
        return (per_seq_B * has_tokens_B).sum() / num_seqs
    sum_p_E = reducer.sum_over_sequence(probs_TE.sum(0))
    tokens = reducer.sum_over_sequence(m_T.sum())
    if scope == "global":
        if global_load_E is None or global_tokens is None:
            raise ValueError("aux_loss_type='global' needs the step's accumulated load and token count")
        # int64 counts; the ratio in float64 (exact operands at any count), then fp32 like the rest
        f_E = (global_load_E.double() * E / (K * global_tokens.double().clamp(min=1.0))).float()
        p_E = sum_p_E / _per_unit(step_per_unit, _TOKENS, tokens.clamp(min=1.0))
        return (f_E * p_E).sum()
    p_E = sum_p_E / tokens.clamp(min=1.0)
    f_E = reducer.sum_over_sequence(load_BE.sum(0)) * E / (K * tokens.clamp(min=1.0))
    loss = (f_E * p_E).sum()
    return loss if step_per_unit is None else loss / step_per_unit[_MICRO_BATCHES]


def z_loss(
    logits_TE: Tensor, valid_T: Tensor | None, *, reducer: StatsReducer, step_per_unit: Tensor | None = None
) -> Tensor:
    """Router z-loss mean_t(logsumexp_e(logits_te))^2 over valid tokens (ST-MoE): this micro-batch's, or with
    `step_per_unit` its share of the mean over every valid token of the step."""
    T = logits_TE.shape[0]
    m_T = _valid_float(valid_T, T, logits_TE.device)
    lse_sq_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    total = reducer.sum_over_sequence((lse_sq_T * m_T).sum())
    tokens = reducer.sum_over_sequence(m_T.sum())
    return total / _per_unit(step_per_unit, _TOKENS, tokens.clamp(min=1.0))

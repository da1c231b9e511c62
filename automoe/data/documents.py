"""Documents inside packed windows: which document each position belongs to, and its position within it.

A window packs documents separated by EOS; an EOS belongs to the document it ends (the model predicts it from
that document), so the next document starts right after it. Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_ids(input_ids_BS: Tensor, eos_id: int) -> Tensor:
    """-> int64 [B, S]: index of each position's document in its row (0, 1, ...; an EOS ends its document)."""
    is_eos_BS = (input_ids_BS == eos_id).long()
    return is_eos_BS.cumsum(1) - is_eos_BS


def document_positions(document_ids_BS: Tensor) -> Tensor:
    """-> int64 [B, S]: each position's offset from the first position of its document (0 at a start)."""
    B, S = document_ids_BS.shape
    index_BS = torch.arange(S, device=document_ids_BS.device).expand(B, S)
    starts_BS = torch.ones_like(document_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = document_ids_BS[:, 1:] != document_ids_BS[:, :-1]
    return index_BS - torch.where(starts_BS, index_BS, 0).cummax(1).values


def num_documents(document_ids_BS: Tensor) -> int:
    """Slots per row for per-document statistics: 1 + the largest id. NOTE: host sync for ids on a device."""
    return int(document_ids_BS.max()) + 1 if document_ids_BS.numel() else 1

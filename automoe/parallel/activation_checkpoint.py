"""Activation checkpointing: recompute whole blocks, or only their MoE FFNs, in the backward pass."""

from __future__ import annotations

import functools
import logging

from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap each block's (mode='full') or MoE layer's (mode='moe') forward in non-reentrant checkpointing.

    The wrap replaces the instance's `forward`, so parameter names (and checkpoints) are unchanged. MoE expert
    load is still counted once: the layer skips counting while the backward pass recomputes it.
    """
    if mode == "none":
        return
    wrapped = 0
    for block in model.layers.values():
        target = block if mode == "full" else getattr(block, "moe", None)
        if target is not None:
            target.forward = functools.partial(_checkpointed, target.forward)
            wrapped += 1
    logger.info("applied activation checkpointing (%s) to %d modules", mode, wrapped)

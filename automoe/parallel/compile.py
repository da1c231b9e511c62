"""`apply_compile`: torch.compile each transformer block in place."""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged); the first step pays the compile time."""
    for block in model.layers.values():
        block.compile()
    logger.info("applied torch.compile to %d blocks", len(model.layers))

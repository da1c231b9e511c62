"""The dense SwiGLU feed-forward network of non-MoE blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init


class FeedForward(nn.Module):
    """`y = down(silu(gate(x)) * up(x))`; x and y are [..., dim], the hidden is [..., inter_dim]."""

    def __init__(self, dim: int, inter_dim: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def init_weights(self, *, std: float, out_std: float) -> None:
        for proj, proj_std in ((self.gate_proj, std), (self.up_proj, std), (self.down_proj, out_std)):
            init.trunc_normal_(proj.weight, std=proj_std)

"""RMSNorm, computed in float32 and scaled in the input dtype (the Llama/Mixtral/Qwen convention)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from automoe import init


class RMSNorm(nn.Module):
    """`y = weight * x / sqrt(mean(x^2, last dim) + eps)`; `x` is [..., dim], `y` has x's shape."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def init_weights(self) -> None:
        init.ones_(self.weight)

"""Shared experts: an always-on SwiGLU MLP added to the routed output, optionally sigmoid-gated."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init
from automoe.config.moe import MoEConfig
from automoe.tensors import torch_dtype


class SharedExperts(nn.Module):
    """`num_shared_experts` experts fused into one MLP of width n * F_shared (as DeepSeek and Qwen do)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        dtype = torch_dtype(cfg.dtype)
        hidden = cfg.shared_inter_dim
        self.gate_proj = nn.Linear(cfg.dim, hidden, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False, dtype=dtype)
        self.gate = nn.Linear(cfg.dim, 1, bias=False, dtype=dtype) if cfg.shared_expert_gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y_TD = self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD

    def init_weights(self, *, std: float = 0.02, out_std: float | None = None) -> None:
        for lin in (self.gate_proj, self.up_proj, self.gate):
            if lin is not None:
                init.trunc_normal_(lin.weight, std=std)
        out_std = std if out_std is None else out_std
        init.trunc_normal_(self.down_proj.weight, std=out_std)

"""DeepSeek-V3 multi-token prediction (MTP, DeepSeek-V3 report §2.2): D sequential modules after the main stack that
predict the tokens 2 .. D + 1 ahead, sharing the embedding and the output head with the main model.

Depth k (1-based) at main position i (0 <= i < S - k) reads the previous depth's hidden state h^{k-1}_i (h^0: the main
model's final, normalized hidden state) and the embedding of token x_{i+k}, at that token's RoPE position:
    h'_i  = eh_proj([enorm(emb(x_{i+k})); hnorm(h^{k-1}_i)])
    h^k   = norm_k(block_k(h'))          (causal over the S - k positions)
    logits^k_i = head(h^k_i)             (predicts x_{i+k+1})
This is transformers' `MtpLayer` / `MtpModel` (embedding first in the concatenation, the normalized output passed on
to the next depth) and the DeepSeek-V3 checkpoint layout (`model.layers.{L+k-1}.{enorm,hnorm,eh_proj,shared_head.norm}`
and a full decoder layer).
Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init
from automoe.config.model import ModelConfig
from automoe.models.norms import RMSNorm
from automoe.tensors import torch_dtype


class MTPModule(nn.Module):
    """One depth: `forward(h_BSD, emb_BSD, cos, sin, *, positions_BS) -> h_BSD` (the normalized output)."""

    def __init__(self, cfg: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        dtype = torch_dtype(cfg.dtype)
        self.enorm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=dtype)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False, dtype=dtype)
        self.block = block  # a transformer Block of layer id num_layers + k - 1
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=dtype)

    def forward(
        self, h_BSD: Tensor, emb_BSD: Tensor, cos_BSA: Tensor, sin_BSA: Tensor, *, positions_BS: Tensor
    ):
        x_BSD = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        return self.norm(self.block(x_BSD, cos_BSA, sin_BSA, positions_BS=positions_BS))

    def init_weights(self, *, std: float, out_std: float) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.init_weights()
        init.trunc_normal_(self.eh_proj.weight, std=std)
        self.block.init_weights(std=std, out_std=out_std)


class MultiTokenPrediction(nn.Module):
    """The D depths (`depths`, keyed "0".."D-1"). `forward(h_BSD, tokens_BS, cos_BSA, sin_BSA, *, positions_BS,
    embed, head) -> [logits^k of shape (B, S - k, V) for k = 1..D]`; `h_BSD` is the main model's normalized final
    hidden state, `cos/sin` the main model's RoPE tables for `positions_BS`."""

    def __init__(self, cfg: ModelConfig, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.depths = nn.ModuleDict({str(k): MTPModule(cfg, block) for k, block in enumerate(blocks)})

    def forward(
        self,
        h_BSD: Tensor,
        tokens_BS: Tensor,
        cos_BSA: Tensor,
        sin_BSA: Tensor,
        *,
        positions_BS: Tensor,
        embed: nn.Module,
        head: nn.Module,
    ) -> list[Tensor]:
        S = tokens_BS.shape[1]
        logits = []
        for k, depth in enumerate(self.depths.values(), start=1):
            h_BSD = depth(  # S - k positions: main positions 0 .. S-k-1, tokens and RoPE of k .. S-1
                h_BSD[:, : S - k],
                embed(tokens_BS[:, k:]),
                cos_BSA[:, k:],
                sin_BSA[:, k:],
                positions_BS=positions_BS[:, k:],
            )
            logits.append(head(h_BSD))
        return logits

    def init_weights(self, *, std: float, out_std: float) -> None:
        for depth in self.depths.values():
            depth.init_weights(std=std, out_std=out_std)


def mtp_ce_sum(logits: list[Tensor], labels_BS: Tensor, *, ignore_index: int = -100) -> Tensor:
    """sum over depths k of the cross-entropy sum of logits^k (B, S - k, V) against labels[:, k:] (the token k + 1
    after each position; `labels_BS` are the main model's next-token labels), in fp32."""
    total = labels_BS.new_zeros((), dtype=torch.float32)
    for k, logits_BSV in enumerate(logits, start=1):
        total = total + F.cross_entropy(
            logits_BSV.float().flatten(0, 1),
            labels_BS[:, k:].flatten(),
            ignore_index=ignore_index,
            reduction="sum",
        )
    return total

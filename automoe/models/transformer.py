"""The decoder-only transformer: embeddings, pre-norm blocks (attention + dense or MoE FFN), norm, output head.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from automoe import init
from automoe.config.model import ModelConfig
from automoe.models.attention import Attention
from automoe.models.kv_cache import KVCache
from automoe.models.mla import LatentRotaryEmbedding, MultiHeadLatentAttention
from automoe.models.mlp import FeedForward
from automoe.models.mtp import MultiTokenPrediction
from automoe.models.norms import RMSNorm
from automoe.models.rope import RotaryEmbedding
from automoe.moe.layer import MoE, moe_layers
from automoe.tensors import torch_dtype


class Block(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x)); y = h + ffn(norm(h))`, the FFN being `feed_forward` or `moe`."""

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        dtype = torch_dtype(cfg.dtype)
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=dtype)
        if cfg.attention == "mla":
            self.attention = MultiHeadLatentAttention(cfg)
        else:
            self.attention = Attention(cfg, sliding_window=cfg.window_of(layer_id))
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=dtype)
        if cfg.is_moe_layer(layer_id):
            self.moe, self.feed_forward = MoE(cfg.moe), None
        else:
            self.moe, self.feed_forward = None, FeedForward(cfg.dim, cfg.ffn_inter_dim, dtype=dtype)

    def forward(
        self,
        x_BSD: Tensor,
        cos_BSA: Tensor,
        sin_BSA: Tensor,
        *,
        positions_BS: Tensor,
        padding_mask_BS: Tensor | None = None,
        document_ids_BS: Tensor | None = None,
        num_documents: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        h_BSD = x_BSD + self.attention(
            self.attention_norm(x_BSD),
            cos_BSA,
            sin_BSA,
            positions_BS=positions_BS,
            padding_mask_BS=padding_mask_BS,
            document_ids_BS=document_ids_BS,
            kv_cache=None if kv_cache is None else kv_cache.layer(self.layer_id),
        )
        ffn_in_BSD = self.ffn_norm(h_BSD)
        if self.moe is not None:
            return h_BSD + self.moe(
                ffn_in_BSD,
                padding_mask_BS=padding_mask_BS,
                document_ids_BS=document_ids_BS,
                num_documents=num_documents,
            )
        return h_BSD + self.feed_forward(ffn_in_BSD)

    def init_weights(self, *, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.attention.init_weights(std=std, out_std=out_std)
        self.ffn_norm.init_weights()
        if self.moe is not None:
            self.moe.init_weights(std=std, out_std=out_std)
        else:
            self.feed_forward.init_weights(std=std, out_std=out_std)


class Transformer(nn.Module):
    """`forward(tokens_BS, *, positions_BS=None, padding_mask_BS=None, document_ids_BS=None,
    num_documents=None, kv_cache=None, mtp=False) -> logits_BSV` (with `mtp=True`: `(logits_BSV, [MTP logits of
    depth k, (B, S - k, V)])`, `automoe.models.mtp`).

    `positions_BS`: RoPE positions (default 0..S-1; the loader's restart per document with document ids; under
    context parallelism they also order the gathered keys, so they must increase along a row or document).
    `padding_mask_BS` True at padding. `document_ids_BS` (packed documents, `automoe.data.documents`):
    attention stays within each document and the `sequence` aux loss is taken per document; `num_documents` is
    then 1 + the largest id over the whole micro-batch, required under context parallelism (every rank must use
    the same count), else derived (a host sync). `kv_cache` (`automoe.models.KVCache`, decoding in one process):
    the tokens continue the cached ones (positions from `kv_cache.length`), whose keys/values are reused.

    Build on the meta device, parallelize, then `to_empty(device=...)` and `init_weights()`:
        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device="cpu"); model.init_weights()
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = torch_dtype(cfg.dtype)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, dtype=dtype)
        if cfg.attention == "mla" or cfg.rope_scaling == "yarn":  # MLA: tables for the RoPE part of each head
            self.rope = LatentRotaryEmbedding(cfg)
        else:
            self.rope = RotaryEmbedding(cfg.rotary_width, max_seq_len=cfg.max_seq_len, theta=cfg.rope_theta)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg) for i in range(cfg.num_layers)})
        # DeepSeek-V3 multi-token prediction: depth k is a block of layer id num_layers + k - 1
        self.mtp = None
        if cfg.mtp_layers:
            blocks = [Block(cfg.num_layers + k, cfg) for k in range(cfg.mtp_layers)]
            self.mtp = MultiTokenPrediction(cfg, blocks)
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, dtype=dtype)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the output head share the embedding parameter (no-op unless `tie_embeddings`).

        Moving off the meta device (`to_empty`) replaces parameters one module at a time and so unties
        them; `init_weights` calls this again.
        """
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens_BS: Tensor,
        *,
        positions_BS: Tensor | None = None,
        padding_mask_BS: Tensor | None = None,
        document_ids_BS: Tensor | None = None,
        num_documents: int | None = None,
        kv_cache: KVCache | None = None,
        mtp: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        B, S = tokens_BS.shape
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None and (padding_mask_BS is not None or document_ids_BS is not None):
            raise ValueError("kv_cache: decoding takes no padding mask or document ids")
        if positions_BS is None:
            if self.cfg.max_seq_len < start + S:
                raise ValueError(
                    f"sequence length {start + S} > ModelConfig.max_seq_len={self.cfg.max_seq_len}"
                )
            positions_BS = torch.arange(start, start + S, device=tokens_BS.device).expand(B, S)
        if document_ids_BS is not None and num_documents is None:
            if any(block.attention.kv_gather is not None for block in self.layers.values()):
                raise ValueError(
                    "document_ids_BS under context parallelism needs num_documents of the whole micro-batch"
                )
            num_documents = int(document_ids_BS.max()) + 1  # NOTE: host sync
        cos_BSA, sin_BSA = self.rope(positions_BS)  # under MLA the width is R, not A
        h_BSD = self.tok_embeddings(tokens_BS)
        for block in self.layers.values():
            h_BSD = block(
                h_BSD,
                cos_BSA,
                sin_BSA,
                positions_BS=positions_BS,
                padding_mask_BS=padding_mask_BS,
                document_ids_BS=document_ids_BS,
                num_documents=num_documents,
                kv_cache=kv_cache,
            )
        if kv_cache is not None:
            kv_cache.advance(S)
        h_BSD = self.norm(h_BSD)
        if not mtp:
            return self.output(h_BSD)
        if self.mtp is None or document_ids_BS is not None or kv_cache is not None:
            raise ValueError("mtp=True needs ModelConfig.mtp_layers > 0, and no document ids or kv_cache")
        mtp_logits = self.mtp(
            h_BSD,
            tokens_BS,
            cos_BSA,
            sin_BSA,
            positions_BS=positions_BS,
            embed=self.tok_embeddings,
            head=self.output,
        )
        return self.output(h_BSD), mtp_logits

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every parameter from the global RNG in a fixed module order (same seed -> same model).

        Linear and embedding weights ~ truncated normal(0, init_std) within 3 std; the projections that write
        into the residual stream (attention o_proj, FFN/expert down projections) use init_std / sqrt(2 L)
        (GPT-2); norms are ones, biases zeros; the RoPE tables are recomputed.
        """
        self.tie_weights()
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        init.trunc_normal_(self.tok_embeddings.weight, std=std)
        self.rope.init_weights()
        for block in self.layers.values():
            block.init_weights(std=std, out_std=out_std)
        self.norm.init_weights()
        if self.mtp is not None:
            self.mtp.init_weights(std=std, out_std=out_std)
        if not self.cfg.tie_embeddings:
            init.trunc_normal_(self.output.weight, std=std)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts: `total` stored, `active` used per token (K routed experts + shared + dense + rest)."""

    total: int
    active: int


def num_params(model_or_cfg: nn.Module | ModelConfig) -> ParamCounts:
    """Count parameters of a model, or of a config by building it on the meta device (nothing allocated).

    Shared parameters (tied embeddings) count once; sharded DTensors count at their global size. A token
    uses only `num_activated_experts` of each MoE layer's `num_experts` routed experts, so `active` drops
    the other experts' share of `moe.experts`; the router and shared experts are always active.
    """
    if isinstance(model_or_cfg, ModelConfig):
        with torch.device("meta"):
            model_or_cfg = Transformer(model_or_cfg)
    total = sum(p.numel() for p in {id(p): p for p in model_or_cfg.parameters()}.values())
    inactive = 0
    for _, moe in moe_layers(model_or_cfg):
        expert_params = sum(p.numel() for p in moe.experts.parameters())
        inactive += expert_params * (moe.num_experts - moe.top_k) // moe.num_experts
    return ParamCounts(total=total, active=total - inactive)

"""Causal grouped-query self-attention on `scaled_dot_product_attention`, with the context-parallel seam.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init
from automoe.config.model import ModelConfig
from automoe.models.kv_cache import LayerKVCache
from automoe.models.norms import RMSNorm
from automoe.models.rope import apply_rotary
from automoe.tensors import torch_dtype

# Mask key of a padding token: larger than every real key, so `key <= query` never admits it as a key,
# while a padding query (also given this key) sees every key of its row and its output stays finite.
PADDING_KEY = torch.iinfo(torch.int64).max
# With packed documents a mask key is (document << DOCUMENT_SHIFT) + position: positions stay below 2**32.
DOCUMENT_SHIFT = 32


class KVGather(Protocol):
    """Set by the context-parallel code as `Attention.kv_gather`: gathers K/V from every CP rank.

    `positions_BS` are the mask keys of the local tokens (`mask_keys`: positions, documents, `PADDING_KEY`);
    they must be gathered as given, in the same order as the K/V rows. Backward must scatter K/V grads back.
    """

    def __call__(self, k_BGSA: Tensor, v_BGSA: Tensor, positions_BS: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (k_BGLA, v_BGLA, positions_BL) over the whole sequence, in any consistent order."""
        ...


def mask_keys(
    positions_BS: Tensor, *, padding_mask_BS: Tensor | None, document_ids_BS: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """-> (keys_BS, lowest_keys_BS): each local token's mask key and the lowest key it may see (None: 0).

    A key is the token's position (increasing along its row), or `(document << DOCUMENT_SHIFT) + position`
    with document ids; query s then sees exactly the keys in [lowest_keys[s], keys[s]]: the earlier positions
    of its own document (block-causal). Padding gets PADDING_KEY: no real query reaches it, and a padding
    query sees itself.
    """
    keys_BS, lowest_keys_BS = positions_BS, None
    if document_ids_BS is not None:
        lowest_keys_BS = document_ids_BS.to(torch.int64) << DOCUMENT_SHIFT
        keys_BS = lowest_keys_BS + positions_BS
    if padding_mask_BS is not None:
        keys_BS = keys_BS.masked_fill(padding_mask_BS, PADDING_KEY)
    return keys_BS, lowest_keys_BS


def visibility_mask(
    query_keys_BS: Tensor,
    key_keys_BL: Tensor,
    lowest_keys_BS: Tensor | None = None,
    *,
    window: int | None = None,
) -> Tensor:
    """[B, 1, S, L] bool, True where query s may attend to key l:
    `lowest_keys[s] <= key_keys[l] <= query_keys[s]` (no lower bound when `lowest_keys_BS` is None) and, with a
    sliding `window`, `key_keys[l] > query_keys[s] - window` (the query and the window - 1 keys before it)."""
    mask_B1SL = key_keys_BL[:, None, None, :] <= query_keys_BS[:, None, :, None]
    if lowest_keys_BS is not None:
        mask_B1SL &= key_keys_BL[:, None, None, :] >= lowest_keys_BS[:, None, :, None]
    if window is not None:  # a padding query (PADDING_KEY) still sees itself
        mask_B1SL &= key_keys_BL[:, None, None, :] > query_keys_BS[:, None, :, None] - window
    return mask_B1SL


class Attention(nn.Module):
    """`forward(x_BSD, cos_BSA, sin_BSA, *, positions_BS, padding_mask_BS=None, document_ids_BS=None)
    -> y_BSD`.

    Causality: without `kv_gather`, query s sees keys 0..s of its own row (index order; `positions_BS`
    only feed RoPE). With `kv_gather` set, query s sees every gathered key whose position is <= its own, so
    `positions_BS` must then increase along the row (global token indices in any chunk layout, e.g.
    load-balanced zigzag; with document ids, positions restarting per document will do). `document_ids_BS`
    (packed documents) makes it block-causal: a query sees only its own document's keys. Padding
    (`padding_mask_BS` True) is never attended to by real tokens. With `kv_cache` (decoding) the new keys and
    values are appended to the cached ones and query s attends to every cached key and the new ones up to s.
    """

    def __init__(self, cfg: ModelConfig, *, sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_dim = cfg.rotary_width  # RoPE rotates the first rope_dim dims of each head (GLM-4.5: half)
        self.sliding_window = sliding_window  # keys a query sees, itself included (None: all earlier ones)
        dtype, bias = torch_dtype(cfg.dtype), cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias  # qkv_bias: biases on q/k/v only (Qwen2)
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=bias, dtype=dtype)
        # q/k norm over head_dim, shared by the heads (Qwen3), or over the whole projection H*A / G*A (OLMoE)
        self.qk_norm_per_head = cfg.qk_norm_scope == "head"
        q_width, k_width = (
            (cfg.head_dim, cfg.head_dim)
            if self.qk_norm_per_head
            else (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
        )
        self.q_norm = RMSNorm(q_width, eps=cfg.norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, eps=cfg.norm_eps, dtype=dtype) if cfg.qk_norm else None
        # GPT-OSS attention sinks: one learned logit per head in every softmax denominator, attending to nothing
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads, dtype=dtype)) if cfg.attention_sinks else None
        self.kv_gather: KVGather | None = None

    def forward(
        self,
        x_BSD: Tensor,
        cos_BSA: Tensor,
        sin_BSA: Tensor,
        *,
        positions_BS: Tensor,
        padding_mask_BS: Tensor | None = None,
        document_ids_BS: Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        q_flat, k_flat = self.q_proj(x_BSD), self.k_proj(x_BSD)  # (B, S, H*A) / (B, S, G*A)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q_flat, k_flat = self.q_norm(q_flat), self.k_norm(k_flat)
        q_BSHA = q_flat.view(B, S, self.num_heads, self.head_dim)
        k_BSGA = k_flat.view(B, S, self.num_kv_heads, self.head_dim)
        v_BSGA = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_per_head:
            q_BSHA, k_BSGA = self.q_norm(q_BSHA), self.k_norm(k_BSGA)
        q_BHSA = self._rotate(q_BSHA.transpose(1, 2), cos_BSA, sin_BSA)
        k_BGSA = self._rotate(k_BSGA.transpose(1, 2), cos_BSA, sin_BSA)
        v_BGSA = v_BSGA.transpose(1, 2)

        if kv_cache is not None:
            y_BHSA = self._cached(q_BHSA, k_BGSA, v_BGSA, kv_cache)
        elif (
            self.kv_gather is None
            and padding_mask_BS is None
            and document_ids_BS is None
            and self.sliding_window is None
            and self.sinks is None
        ):
            # Fast path: no mask tensor, so flash-style kernels (which support GQA natively) can run.
            y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BGSA, v_BGSA, is_causal=True, enable_gqa=True)
        else:
            y_BHSA = self._masked(q_BHSA, k_BGSA, v_BGSA, positions_BS, padding_mask_BS, document_ids_BS)
        return self.o_proj(y_BHSA.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))

    def _cached(self, q_BHSA: Tensor, k_BGSA: Tensor, v_BGSA: Tensor, kv_cache: LayerKVCache) -> Tensor:
        """Attention of the new queries over the cached keys and the new ones (causal by position)."""
        S = q_BHSA.shape[2]
        k_BGLA, v_BGLA = kv_cache.update(k_BGSA, v_BGSA)
        if self.sliding_window is not None or self.sinks is not None:  # an explicit mask: window, sink logits
            key_keys_1L = torch.arange(k_BGLA.shape[2], device=q_BHSA.device)[None]
            mask_11SL = visibility_mask(key_keys_1L[:, -S:], key_keys_1L, window=self.sliding_window)
            return self._attend(q_BHSA, k_BGLA, v_BGLA, mask_11SL)
        mask_SL = kv_cache.causal_mask(S, q_BHSA.device)
        if mask_SL is None:  # one new query sees every key; a first chunk is plain causal attention
            return F.scaled_dot_product_attention(q_BHSA, k_BGLA, v_BGLA, is_causal=S > 1, enable_gqa=True)
        repeat = self.num_heads // self.num_kv_heads
        k_BHLA = k_BGLA.repeat_interleave(repeat, dim=1)
        v_BHLA = v_BGLA.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q_BHSA, k_BHLA, v_BHLA, attn_mask=mask_SL)

    def _masked(
        self,
        q_BHSA: Tensor,
        k_BGSA: Tensor,
        v_BGSA: Tensor,
        positions_BS: Tensor,
        padding_mask_BS: Tensor | None,
        document_ids_BS: Tensor | None,
    ) -> Tensor:
        """Attention with an explicit mask: padding, documents and/or keys gathered from CP ranks."""
        B, _, S, _ = q_BHSA.shape
        if self.kv_gather is None:  # causal by index within the row
            order_BS = torch.arange(S, device=q_BHSA.device).expand(B, S)
        else:  # causal by position across ranks
            order_BS = positions_BS.expand(B, S)
        query_keys_BS, lowest_keys_BS = mask_keys(
            order_BS, padding_mask_BS=padding_mask_BS, document_ids_BS=document_ids_BS
        )
        if self.kv_gather is None:
            k_BGLA, v_BGLA, key_keys_BL = k_BGSA, v_BGSA, query_keys_BS
        else:
            k_BGLA, v_BGLA, key_keys_BL = self.kv_gather(k_BGSA, v_BGSA, query_keys_BS)
        mask_B1SL = visibility_mask(query_keys_BS, key_keys_BL, lowest_keys_BS, window=self.sliding_window)
        return self._attend(q_BHSA, k_BGLA, v_BGLA, mask_B1SL)

    def _attend(self, q_BHSA: Tensor, k_BGLA: Tensor, v_BGLA: Tensor, mask_B1SL: Tensor) -> Tensor:
        """SDPA under a boolean mask (and the sinks, when the layer has them)."""
        # Masked kernels (memory-efficient, cuDNN) do not take enable_gqa: expand K/V to every query head.
        repeat = self.num_heads // self.num_kv_heads
        k_BHLA = k_BGLA.repeat_interleave(repeat, dim=1)
        v_BHLA = v_BGLA.repeat_interleave(repeat, dim=1)
        if self.sinks is not None:
            return self._with_sinks(q_BHSA, k_BHLA, v_BHLA, mask_B1SL)
        return F.scaled_dot_product_attention(q_BHSA, k_BHLA, v_BHLA, attn_mask=mask_B1SL)

    def _rotate(self, x_BHSA: Tensor, cos_BSR: Tensor, sin_BSR: Tensor) -> Tensor:
        """RoPE on the first rope_dim dims of every head (partial rotary), the rest passed through."""
        if self.rope_dim == self.head_dim:
            return apply_rotary(x_BHSA, cos_BSR, sin_BSR)
        rotated = apply_rotary(x_BHSA[..., : self.rope_dim], cos_BSR, sin_BSR)
        return torch.cat([rotated, x_BHSA[..., self.rope_dim :]], dim=-1)

    def _with_sinks(self, q_BHSA: Tensor, k_BHLA: Tensor, v_BHLA: Tensor, mask_B1SL: Tensor) -> Tensor:
        """Attention whose softmax denominators also hold exp(sinks[h]): one extra key of zeros, with a zero value,
        that every query sees with logit sinks[h] (an additive float mask, so SDPA still runs; the sinks get
        their gradient through the mask)."""
        B, H, S, A = q_BHSA.shape
        zeros_BH1A = q_BHSA.new_zeros(B, H, 1, A)
        k_sink = torch.cat([k_BHLA, zeros_BH1A], dim=2)  # (B, H, L + 1, A)
        v_sink = torch.cat([v_BHLA, zeros_BH1A], dim=2)
        bias_B1SL = torch.zeros(mask_B1SL.shape, dtype=q_BHSA.dtype, device=q_BHSA.device)
        bias_B1SL = bias_B1SL.masked_fill(~mask_B1SL, float("-inf"))
        sink_BHS1 = self.sinks.to(q_BHSA.dtype).view(1, H, 1, 1).expand(B, H, S, 1)
        bias = torch.cat([bias_B1SL.expand(B, H, S, -1), sink_BHS1], dim=-1)  # (B, H, S, L + 1)
        return F.scaled_dot_product_attention(q_BHSA, k_sink, v_sink, attn_mask=bias)

    def init_weights(self, *, std: float, out_std: float) -> None:
        for proj, proj_std in (
            (self.q_proj, std),
            (self.k_proj, std),
            (self.v_proj, std),
            (self.o_proj, out_std),
        ):
            init.trunc_normal_(proj.weight, std=proj_std)
            if proj.bias is not None:
                init.zeros_(proj.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()
        if self.sinks is not None:
            init.trunc_normal_(self.sinks, std=std)

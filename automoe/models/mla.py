"""Multi-head Latent Attention (DeepSeek-V2/V3): low-rank compressed queries and keys/values, a decoupled RoPE
part of each head (one rotated key shared by all heads), and YaRN-scaled rotary tables.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import init
from automoe.config.model import ModelConfig
from automoe.models.attention import KVGather, mask_keys, visibility_mask
from automoe.models.kv_cache import LayerKVCache
from automoe.models.norms import RMSNorm
from automoe.models.rope import apply_rotary
from automoe.tensors import torch_dtype

# RMSNorm epsilon of the two latent norms: DeepSeek's reference code and HF build them with the RMSNorm default
# (1e-6), not with the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction `0.1 * mscale * ln(scale) + 1` (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(
    dim: int,
    *,
    theta: float,
    factor: float,
    original_max_seq_len: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool = True,
    device: torch.device | None = None,
) -> Tensor:
    """[dim/2] fp32 YaRN frequencies: high frequencies (> beta_fast rotations over the original context) kept,
    low ones (< beta_slow rotations) divided by `factor`, a linear ramp between (band edges floored/ceiled, or
    exact with `truncate=False` as GPT-OSS)."""

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate (divide by factor)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(O + R), times yarn_mscale(factor, yarn_mscale_all_dim)^2 under YaRN (DeepSeek-V3)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
        scale *= yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2
    return scale


class LatentRotaryEmbedding(nn.Module):
    """cos/sin tables [P, R] (fp32, non-persistent) for the RoPE part of MLA heads (or of GQA heads under YaRN:
    R = `cfg.rotary_width`), optionally YaRN-scaled.

    Same interface as `RotaryEmbedding`: `forward(positions_BS) -> (cos_BSR, sin_BSR)`; `init_weights` rebuilds
    the tables after `to_empty`. Under YaRN the tables carry the cos/sin gain (HF `attention_factor`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cos_PR, sin_PR = self._tables(device=None)
        self.register_buffer("cos_PR", cos_PR, persistent=False)
        self.register_buffer("sin_PR", sin_PR, persistent=False)

    def _tables(self, *, device: torch.device | None) -> tuple[Tensor, Tensor]:
        cfg, R = self.cfg, self.cfg.rotary_width
        gain = 1.0
        if cfg.rope_scaling == "yarn":
            inv_freq = yarn_inv_freq(
                R,
                theta=cfg.rope_theta,
                factor=cfg.yarn_factor,
                original_max_seq_len=cfg.yarn_original_max_seq_len,
                beta_fast=cfg.yarn_beta_fast,
                beta_slow=cfg.yarn_beta_slow,
                truncate=cfg.yarn_truncate,
                device=device,
            )
            if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
                gain = yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale) / yarn_mscale(
                    cfg.yarn_factor, cfg.yarn_mscale_all_dim
                )
            else:
                gain = yarn_mscale(cfg.yarn_factor)
        else:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, device=device).float() / R))
        half_angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)  # (P, R/2)
        angles_PR = torch.cat([half_angles, half_angles], dim=-1)
        return angles_PR.cos() * gain, angles_PR.sin() * gain

    def init_weights(self) -> None:
        cos_PR, sin_PR = self._tables(device=self.cos_PR.device)
        with torch.no_grad():
            self.cos_PR.copy_(cos_PR)
            self.sin_PR.copy_(sin_PR)

    def forward(self, positions_BS: Tensor) -> tuple[Tensor, Tensor]:
        return self.cos_PR[positions_BS], self.sin_PR[positions_BS]


def apply_rotary_interleaved(x_BHSR: Tensor, cos_BSR: Tensor, sin_BSR: Tensor) -> Tensor:
    """Rotate pairs (2i, 2i+1) by angle i; the result is laid out de-interleaved ([evens | odds] rotated).

    Queries and keys get the same layout, so q.k equals the interleaved rotation's (HF `rope_interleave`).
    """
    half = cos_BSR.shape[-1] // 2
    cos_half = cos_BSR[..., :half].unsqueeze(1).to(x_BHSR.dtype)  # (B, 1, S, R/2)
    sin_half = sin_BSR[..., :half].unsqueeze(1).to(x_BHSR.dtype)
    x1, x2 = x_BHSR[..., 0::2], x_BHSR[..., 1::2]
    return torch.cat([x1 * cos_half - x2 * sin_half, x2 * cos_half + x1 * sin_half], dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """`forward(x_BSD, cos_BSR, sin_BSR, *, positions_BS, padding_mask_BS=None, document_ids_BS=None)
    -> y_BSD` (masking as `Attention`).

    q = q_b(norm(q_a(x))) (or q_proj(x) when q_lora_rank is None), split per head into [nope O | rope R];
    kv_a(x) = [latent C | k_rope R]; k_nope and v come from kv_b(norm(latent)); the rotated k_rope is shared
    by every head. Softmax scale: `mla_softmax_scale(cfg)`.

    Context parallelism: the same `kv_gather` seam as `Attention`, but MLA hands it the compressed tensors,
    `kv_gather(latent_B1SC, k_rope_B1SR, positions_BS)`: the normalized latent in the K slot and the rotated
    shared RoPE key in the V slot (one "head" each, different widths). A gather must therefore work along dim 2
    for any [B, G, S, *] pair. Every rank then expands the gathered latents with its own kv_b weights, which
    moves (C + R) numbers per token instead of H * (Q + W).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.rope_interleave = cfg.kv_lora_rank, cfg.rope_interleave
        self.softmax_scale = mla_softmax_scale(cfg)
        H, Q, dtype, bias = (
            cfg.num_heads,
            self.nope_dim + self.rope_dim,
            torch_dtype(cfg.dtype),
            cfg.attention_bias,
        )
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, H * Q, bias=False, dtype=dtype)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=bias, dtype=dtype)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * Q, bias=False, dtype=dtype)
        self.kv_a_proj = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.rope_dim, bias=bias, dtype=dtype)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS, dtype=dtype)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False, dtype=dtype
        )
        self.o_proj = nn.Linear(H * self.v_dim, cfg.dim, bias=bias, dtype=dtype)
        self.kv_gather: KVGather | None = None

    def _rotate(self, x_BHSR: Tensor, cos_BSR: Tensor, sin_BSR: Tensor) -> Tensor:
        if self.rope_interleave:
            return apply_rotary_interleaved(x_BHSR, cos_BSR, sin_BSR)
        return apply_rotary(x_BHSR, cos_BSR, sin_BSR)

    def forward(
        self,
        x_BSD: Tensor,
        cos_BSR: Tensor,
        sin_BSR: Tensor,
        *,
        positions_BS: Tensor,
        padding_mask_BS: Tensor | None = None,
        document_ids_BS: Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        H, O, R, W = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim  # noqa: E741 (the legend's letters)
        q_flat = (  # (B, S, H*Q)
            self.q_proj(x_BSD)
            if self.q_proj is not None
            else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        )
        q_nope_BHSO, q_rope_BHSR = q_flat.view(B, S, H, O + R).transpose(1, 2).split([O, R], dim=-1)
        latent_BSC, k_rope_BSR = self.kv_a_proj(x_BSD).split([self.kv_rank, R], dim=-1)
        latent_B1SC = self.kv_a_norm(latent_BSC).unsqueeze(1)
        q_rope_BHSR = self._rotate(q_rope_BHSR, cos_BSR, sin_BSR)
        k_rope_B1SR = self._rotate(k_rope_BSR.unsqueeze(1), cos_BSR, sin_BSR)

        mask_B1SL = None
        if kv_cache is not None:  # decoding: the cache holds the compressed pair (expanded below)
            latent_B1SC, k_rope_B1SR = kv_cache.update(latent_B1SC, k_rope_B1SR)
            mask_SL = kv_cache.causal_mask(S, x_BSD.device)
            mask_B1SL = None if mask_SL is None else mask_SL.expand(B, 1, S, -1)
        elif self.kv_gather is not None or padding_mask_BS is not None or document_ids_BS is not None:
            order_BS = (
                torch.arange(S, device=x_BSD.device).expand(B, S)
                if self.kv_gather is None
                else positions_BS.expand(B, S)
            )
            query_keys_BS, lowest_keys_BS = mask_keys(
                order_BS, padding_mask_BS=padding_mask_BS, document_ids_BS=document_ids_BS
            )
            key_keys_BL = query_keys_BS
            if self.kv_gather is not None:
                latent_B1SC, k_rope_B1SR, key_keys_BL = self.kv_gather(
                    latent_B1SC, k_rope_B1SR, query_keys_BS
                )
            mask_B1SL = visibility_mask(query_keys_BS, key_keys_BL, lowest_keys_BS)

        L = latent_B1SC.shape[2]
        kv = self.kv_b_proj(latent_B1SC.squeeze(1)).view(B, L, H, O + W).transpose(1, 2)  # (B, H, L, O+W)
        k_nope_BHLO, v_BHLW = kv.split([O, W], dim=-1)
        k_BHLQ = torch.cat([k_nope_BHLO, k_rope_B1SR.expand(B, H, L, R)], dim=-1)
        q_BHSQ = torch.cat([q_nope_BHSO, q_rope_BHSR], dim=-1)
        y_BHSW = F.scaled_dot_product_attention(
            q_BHSQ,
            k_BHLQ,
            v_BHLW,
            attn_mask=mask_B1SL,
            is_causal=mask_B1SL is None and S > 1,
            scale=self.softmax_scale,
        )
        return self.o_proj(y_BHSW.transpose(1, 2).reshape(B, S, H * W))

    def init_weights(self, *, std: float, out_std: float) -> None:
        projections = (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj, self.kv_b_proj, self.o_proj)
        for proj in projections:
            if proj is None:
                continue
            init.trunc_normal_(proj.weight, std=out_std if proj is self.o_proj else std)
            if proj.bias is not None:
                init.zeros_(proj.bias)
        for norm in (self.q_a_norm, self.kv_a_norm):
            if norm is not None:
                norm.init_weights()

"""Block-fp8 checkpoints (DeepSeek-V3, Qwen3 `-FP8`): dequantized on import.

`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}`: every
quantized weight `X.weight` (float8_e4m3fn [R, C], or a fused expert tensor [E, R, C]) comes with
`X.weight_scale_inv` (fp32 [ceil(R / 128), ceil(C / 128)], [E, ...] for fused ones; fused tensors without a
`.weight` suffix take `_scale_inv` as is). The real value of element (r, c) is `w[r, c] * scale_inv[r // 128,
c // 128]` (DeepSeek's `weight_dequant`: the name says inverse, the stored number is the multiplier). Tensors
without a scale (embeddings, head, norms, routers, biases) are stored unquantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors header names


@dataclass(frozen=True)
class BlockFP8:
    """The block size (rows, cols) one `weight_scale_inv` entry covers."""

    block: tuple[int, int] = (128, 128)

    @staticmethod
    def from_hf_config(hf: dict[str, Any]) -> BlockFP8 | None:
        """None for an unquantized checkpoint; raises ValueError naming a quantization it cannot dequantize."""
        qc = hf.get("quantization_config")
        if not qc:
            return None
        method = qc.get("quant_method")

        def unsupported(what: str) -> ValueError:
            return ValueError(
                f"HF config quantization_config={method!r} is not supported: {what}; only block-wise fp8 "
                "(quant_method 'fp8', fmt 'e4m3', weight_block_size, dynamic activations: DeepSeek-V3's format) "
                "is dequantized on import"
            )

        if method != "fp8":
            raise unsupported("dequantize the weights first")
        block = qc.get("weight_block_size")
        if not block or len(block) != 2 or min(block) <= 0:
            raise unsupported(f"weight_block_size={block!r} (per-tensor fp8 scales are not read)")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise unsupported(f"fmt={qc.get('fmt')!r}")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise unsupported(f"activation_scheme={qc.get('activation_scheme')!r} (static input scales)")
        return BlockFP8((int(block[0]), int(block[1])))

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        R, C = weight_shape[-2:]
        return (*weight_shape[:-2], math.ceil(R / self.block[0]), math.ceil(C / self.block[1]))

    def dequantize(self, w: Tensor, scale_inv: Tensor) -> Tensor:
        """fp32 values of a quantized `w` [..., R, C] with its block scales [..., ceil(R/b0), ceil(C/b1)]."""
        R, C = w.shape[-2:]
        if tuple(scale_inv.shape) != self.scale_shape(tuple(w.shape)):
            raise ValueError(
                f"fp8 scale of shape {list(scale_inv.shape)} does not tile a weight of shape {list(w.shape)} "
                f"in {self.block[0]}x{self.block[1]} blocks (expected {list(self.scale_shape(tuple(w.shape)))})"
            )
        full = scale_inv.float().repeat_interleave(self.block[0], dim=-2)[..., :R, :]
        full = full.repeat_interleave(self.block[1], dim=-1)[..., :C]
        return w.float() * full


def scale_key(key: str) -> str:
    """`X.weight` -> `X.weight_scale_inv`; a fused expert tensor `...experts.gate_up_proj` -> `..._scale_inv`."""
    return key + SCALE_SUFFIX


def weight_key(scale: str) -> str | None:
    """Inverse of `scale_key` (None when `scale` is not a scale key)."""
    return scale[: -len(SCALE_SUFFIX)] if scale.endswith(SCALE_SUFFIX) else None


def quantize_block_fp8(w: Tensor, block: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv) of `w` [..., R, C], each block scaled to the e4m3 range (for tests
    and tools: how DeepSeek's checkpoints were made)."""
    q = BlockFP8(block)
    R, C = w.shape[-2:]
    rb, cb = q.scale_shape(tuple(w.shape))[-2:]
    padded = torch.zeros(*w.shape[:-2], rb * block[0], cb * block[1], dtype=torch.float32)
    padded[..., :R, :C] = w.float()
    blocks = padded.unflatten(-1, (cb, block[1])).unflatten(-3, (rb, block[0]))  # [..., rb, b0, cb, b1]
    amax = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12)  # [..., rb, cb]
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    full = scale.repeat_interleave(block[0], dim=-2)[..., :R, :].repeat_interleave(block[1], dim=-1)[..., :C]
    return (w.float() / full).to(torch.float8_e4m3fn), scale

"""Rotary position embedding (RoPE) in the rotate-half layout of HF Llama/Mixtral/Qwen, so their q/k weights
import without a permutation: dimension i pairs with i + head_dim/2.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [P, A] (fp32, non-persistent buffers) looked up by absolute position.

    The tables are rebuilt by `init_weights`, so a model built on the meta device and materialized with
    `to_empty` gets correct values.
    """

    def __init__(self, head_dim: int, *, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos_PA, sin_PA = self._tables(device=None)
        self.register_buffer("cos_PA", cos_PA, persistent=False)
        self.register_buffer("sin_PA", sin_PA, persistent=False)

    def _tables(self, *, device: torch.device | None) -> tuple[Tensor, Tensor]:
        # Same fp32 arithmetic as HF (inv_freq in fp32, one fp32 product per entry) so imported checkpoints
        # see bit-identical angles.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        half_angles = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)  # (P, A/2)
        angles_PA = torch.cat([half_angles, half_angles], dim=-1)
        return angles_PA.cos(), angles_PA.sin()

    def init_weights(self) -> None:
        cos_PA, sin_PA = self._tables(device=self.cos_PA.device)
        with torch.no_grad():
            self.cos_PA.copy_(cos_PA)
            self.sin_PA.copy_(sin_PA)

    def forward(self, positions_BS: Tensor) -> tuple[Tensor, Tensor]:
        """-> (cos_BSA, sin_BSA) in fp32 for the given absolute positions (each < max_seq_len)."""
        return self.cos_PA[positions_BS], self.sin_PA[positions_BS]


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHSA: Tensor, cos_BSA: Tensor, sin_BSA: Tensor) -> Tensor:
    """Rotate each (i, i + A/2) pair of `x_BHSA` by its position's angle; the tables are cast to x's dtype (as HF)."""
    cos_B1SA = cos_BSA.unsqueeze(1).to(x_BHSA.dtype)
    sin_B1SA = sin_BSA.unsqueeze(1).to(x_BHSA.dtype)
    return x_BHSA * cos_B1SA + rotate_half(x_BHSA) * sin_B1SA

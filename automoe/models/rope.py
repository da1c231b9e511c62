"""Rotary position embedding (RoPE) in the rotate-half layout of HF Llama/Mixtral/Qwen, so their q/k weights
import without a permutation: dimension i pairs with i + head_dim/2.

Letters: B batch, S positions, P table positions (max_seq_len), H heads, D head_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [P, D] (fp32, non-persistent buffers) looked up by absolute position.

    The tables are rebuilt by `init_weights`, so a model built on the meta device and materialized with
    `to_empty` gets correct values.
    """

    def __init__(self, head_dim: int, *, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos_PD, sin_PD = self._tables(device=None)
        self.register_buffer("cos_PD", cos_PD, persistent=False)
        self.register_buffer("sin_PD", sin_PD, persistent=False)

    def _tables(self, *, device: torch.device | None) -> tuple[Tensor, Tensor]:
        # Same fp32 arithmetic as HF (inv_freq in fp32, one fp32 product per entry) so imported checkpoints
        # see bit-identical angles.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        angles_PD2 = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)
        angles_PD = torch.cat([angles_PD2, angles_PD2], dim=-1)
        return angles_PD.cos(), angles_PD.sin()

    def init_weights(self) -> None:
        cos_PD, sin_PD = self._tables(device=self.cos_PD.device)
        with torch.no_grad():
            self.cos_PD.copy_(cos_PD)
            self.sin_PD.copy_(sin_PD)

    def forward(self, positions_BS: Tensor) -> tuple[Tensor, Tensor]:
        """-> (cos_BSD, sin_BSD) in fp32 for the given absolute positions (each < max_seq_len)."""
        return self.cos_PD[positions_BS], self.sin_PD[positions_BS]


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    """Rotate each (i, i + D/2) pair of `x_BHSD` by its position's angle; the tables are cast to x's dtype (as HF)."""
    cos_B1SD = cos_BSD.unsqueeze(1).to(x_BHSD.dtype)
    sin_B1SD = sin_BSD.unsqueeze(1).to(x_BHSD.dtype)
    return x_BHSD * cos_B1SD + rotate_half(x_BHSD) * sin_B1SD

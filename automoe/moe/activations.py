"""Expert activations: plain autograd forms (the oracle) and fused forward/backward pairs for the fast path.

The fused pairs let the grouped experts keep only the pre-activation h_NU for backward and recompute the rest.
Shape suffixes: docs/architecture.md#shape-legend (U = 2F for gated activations, gate columns first, else F).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# geglu and gelu use the exact (erf) GELU, as in Shazeer (2020) "GLU Variants Improve Transformer".


def _split_gated(h_NU: Tensor) -> tuple[Tensor, Tensor]:
    half = h_NU.shape[-1] // 2
    return h_NU[..., :half], h_NU[..., half:]


def _swish(g_NF: Tensor, alpha: float) -> Tensor:
    """g * sigmoid(alpha * g): SiLU for alpha = 1 (GPT-OSS: alpha = 1.702)."""
    return F.silu(g_NF) if alpha == 1.0 else g_NF * torch.sigmoid(alpha * g_NF)


def reference_activation(
    h_NU: Tensor, *, name: str, limit: float | None = None, alpha: float = 1.0, up_shift: float = 0.0
) -> Tensor:
    """a_NF = act(h_NU) written with plain differentiable ops (the oracle the fused pairs are tested against).
    swiglu: `swish_alpha(g) * (u + up_shift)` after the optional clamp (GPT-OSS: alpha 1.702, shift 1)."""
    if name in ("swiglu", "geglu"):
        g_NF, u_NF = _split_gated(h_NU)
        if limit is not None:
            g_NF, u_NF = g_NF.clamp(max=limit), u_NF.clamp(min=-limit, max=limit)
        return (_swish(g_NF, alpha) if name == "swiglu" else F.gelu(g_NF)) * (u_NF + up_shift)
    if name == "relu2":
        return torch.relu(h_NU).square()
    if name == "gelu":
        return F.gelu(h_NU)
    if name == "relu":
        return torch.relu(h_NU)
    raise ValueError(f"MoEConfig.expert_activation={name!r} is not supported")


@dataclass(frozen=True)
class FusedActivation:
    """`forward(h_NU) -> a_NF` without autograd and `backward(h_NU, da_NF) -> (dh_NU, a_NF)`.

    backward recomputes a_NF (the down projection's weight gradient needs it) from h_NU alone, so the caller
    saves only h_NU. Gated results are written straight into halves of one [N, 2F] buffer (no concatenation).
    backward may overwrite `da_NF` (its buffer is reused as scratch).
    """

    name: str
    limit: float | None = None
    alpha: float = 1.0  # swiglu: g * sigmoid(alpha * g)
    up_shift: float = 0.0  # swiglu: times (u + up_shift)

    def forward(self, h_NU: Tensor) -> Tensor:
        name = self.name
        if name in ("swiglu", "geglu"):
            g_NF, u_NF = self._clamped(h_NU)
            a_NF = _swish(g_NF, self.alpha) if name == "swiglu" else F.gelu(g_NF)
            return a_NF.mul_(u_NF)
        if name == "relu2":
            return torch.relu(h_NU).square_()
        if name == "gelu":
            return F.gelu(h_NU)
        return torch.relu(h_NU)

    def backward(self, h_NU: Tensor, da_NF: Tensor) -> tuple[Tensor, Tensor]:
        name = self.name
        if name in ("swiglu", "geglu"):
            return self._gated_backward(h_NU, da_NF)
        if name == "relu2":
            r_NF = torch.relu(h_NU)
            dh_NF = torch.mul(r_NF, da_NF).mul_(2.0)  # d relu(h)^2 = 2 relu(h)
            return dh_NF, r_NF.square_()
        if name == "gelu":
            return torch.ops.aten.gelu_backward(da_NF, h_NU), F.gelu(h_NU)
        return torch.ops.aten.threshold_backward(da_NF, h_NU, 0), torch.relu(h_NU)

    def _clamped(self, h_NU: Tensor) -> tuple[Tensor, Tensor]:
        """(gate, up + up_shift), clamped first when `limit` is set."""
        g_NF, u_NF = _split_gated(h_NU)
        if self.limit is not None:
            g_NF, u_NF = g_NF.clamp(max=self.limit), u_NF.clamp(min=-self.limit, max=self.limit)
        return g_NF, (u_NF + self.up_shift if self.up_shift else u_NF)

    def _gated_backward(self, h_NU: Tensor, da_NF: Tensor) -> tuple[Tensor, Tensor]:
        g_NF, u_NF = self._clamped(h_NU)
        act_NF = _swish(g_NF, self.alpha) if self.name == "swiglu" else F.gelu(g_NF)
        dh_NU = torch.empty_like(h_NU)
        dg_NF, du_NF = _split_gated(dh_NU)
        torch.mul(da_NF, act_NF, out=du_NF)
        gu_NF = da_NF.mul_(u_NF)  # gradient reaching act(g), in da's buffer
        if self.name == "swiglu" and self.alpha != 1.0:  # d/dg g*s(ag) = s + a*g*s*(1 - s), s = sigmoid(ag)
            s_NF = torch.sigmoid(self.alpha * g_NF)
            torch.mul(gu_NF, s_NF * (1 + self.alpha * g_NF * (1 - s_NF)), out=dg_NF)
        elif self.name == "swiglu":
            torch.ops.aten.silu_backward.grad_input(gu_NF, g_NF, grad_input=dg_NF)
        else:
            torch.ops.aten.gelu_backward.grad_input(gu_NF, g_NF, grad_input=dg_NF)
        if self.limit is not None:  # clamp passes the gradient only where the input was inside the range
            g_raw_NF, u_raw_NF = _split_gated(h_NU)
            dg_NF.masked_fill_(g_raw_NF > self.limit, 0)
            du_NF.masked_fill_(u_raw_NF.abs() > self.limit, 0)
        return dh_NU, act_NF.mul_(u_NF)

"""Expert activations: plain autograd forms (the oracle) and fused forward/backward pairs for the fast path.

Letters: N routed rows, F expert hidden width, H = 2F for gated activations (gate columns first) else F.
The fused pairs let the grouped experts keep only the pre-activation h_NH for backward and recompute the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# geglu and gelu use the exact (erf) GELU, as in Shazeer (2020) "GLU Variants Improve Transformer".


def _split_gated(h_NH: Tensor) -> tuple[Tensor, Tensor]:
    half = h_NH.shape[-1] // 2
    return h_NH[..., :half], h_NH[..., half:]


def reference_activation(h_NH: Tensor, *, name: str, limit: float | None = None) -> Tensor:
    """a_NF = act(h_NH) written with plain differentiable ops (the oracle the fused pairs are tested against)."""
    if name in ("swiglu", "geglu"):
        g_NF, u_NF = _split_gated(h_NH)
        if limit is not None:
            g_NF, u_NF = g_NF.clamp(max=limit), u_NF.clamp(min=-limit, max=limit)
        return (F.silu(g_NF) if name == "swiglu" else F.gelu(g_NF)) * u_NF
    if name == "relu2":
        return torch.relu(h_NH).square()
    if name == "gelu":
        return F.gelu(h_NH)
    if name == "relu":
        return torch.relu(h_NH)
    raise ValueError(f"MoEConfig.expert_activation={name!r} is not supported")


@dataclass(frozen=True)
class FusedActivation:
    """`forward(h_NH) -> a_NF` without autograd and `backward(h_NH, da_NF) -> (dh_NH, a_NF)`.

    backward recomputes a_NF (the down projection's weight gradient needs it) from h_NH alone, so the caller
    saves only h_NH. Gated results are written straight into halves of one [N, 2F] buffer (no concatenation).
    backward may overwrite `da_NF` (its buffer is reused as scratch).
    """

    name: str
    limit: float | None = None

    def forward(self, h_NH: Tensor) -> Tensor:
        name = self.name
        if name in ("swiglu", "geglu"):
            g_NF, u_NF = self._clamped(h_NH)
            a_NF = F.silu(g_NF) if name == "swiglu" else F.gelu(g_NF)
            return a_NF.mul_(u_NF)
        if name == "relu2":
            return torch.relu(h_NH).square_()
        if name == "gelu":
            return F.gelu(h_NH)
        return torch.relu(h_NH)

    def backward(self, h_NH: Tensor, da_NF: Tensor) -> tuple[Tensor, Tensor]:
        name = self.name
        if name in ("swiglu", "geglu"):
            return self._gated_backward(h_NH, da_NF)
        if name == "relu2":
            r_NF = torch.relu(h_NH)
            dh_NF = torch.mul(r_NF, da_NF).mul_(2.0)  # d relu(h)^2 = 2 relu(h)
            return dh_NF, r_NF.square_()
        if name == "gelu":
            return torch.ops.aten.gelu_backward(da_NF, h_NH), F.gelu(h_NH)
        return torch.ops.aten.threshold_backward(da_NF, h_NH, 0), torch.relu(h_NH)

    def _clamped(self, h_NH: Tensor) -> tuple[Tensor, Tensor]:
        g_NF, u_NF = _split_gated(h_NH)
        if self.limit is not None:
            g_NF, u_NF = g_NF.clamp(max=self.limit), u_NF.clamp(min=-self.limit, max=self.limit)
        return g_NF, u_NF

    def _gated_backward(self, h_NH: Tensor, da_NF: Tensor) -> tuple[Tensor, Tensor]:
        g_NF, u_NF = self._clamped(h_NH)
        act_NF = F.silu(g_NF) if self.name == "swiglu" else F.gelu(g_NF)
        dh_NH = torch.empty_like(h_NH)
        dg_NF, du_NF = _split_gated(dh_NH)
        torch.mul(da_NF, act_NF, out=du_NF)
        gu_NF = da_NF.mul_(u_NF)  # gradient reaching act(g), in da's buffer
        if self.name == "swiglu":
            torch.ops.aten.silu_backward.grad_input(gu_NF, g_NF, grad_input=dg_NF)
        else:
            torch.ops.aten.gelu_backward.grad_input(gu_NF, g_NF, grad_input=dg_NF)
        if self.limit is not None:  # clamp passes the gradient only where the input was inside the range
            g_raw_NF, u_raw_NF = _split_gated(h_NH)
            dg_NF.masked_fill_(g_raw_NF > self.limit, 0)
            du_NF.masked_fill_(u_raw_NF.abs() > self.limit, 0)
        return dh_NH, act_NF.mul_(u_NF)

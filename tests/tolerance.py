"""Tolerances derived from the computation, the one rule the suite uses for inexact comparisons.

Two evaluations of the same math that differ only in the order of floating-point operations (another GEMM
blocking, another reduction tree, another rank layout, another CPU's kernels) differ by rounding error. For a sum
of n terms the error is at most gamma_n * sum|term|, gamma_n ~ n*u (u = unit roundoff = eps/2); two such
evaluations are each within that bound of the exact value, hence within twice it of each other. A chain of
`depth` such reductions (layers, an optimizer step after a backward) adds one bound per stage. The tolerance is
therefore `2 * depth * n * u * scale`, with `scale` the magnitude of one output's terms: sum|term| where it is at
hand (Higham's bound for recursive summation), else the largest absolute value of the reference. The stand-in
ignores cancellation, but rounding errors in practice grow like sqrt(n) while the bound grows like n, which leaves
that room. It holds on every CPU, yet a real bug (an O(1) relative error, a missing term, a wrong sign) stays far
outside it.

Bit-exact comparisons (`assert_equal`) are for results that are exact by construction: the same kernels on the
same shapes in the same process, integer results, copies.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the relative error of one correctly rounded operation in `dtype`."""
    return torch.finfo(dtype).eps / 2


def rounding_atol(dtype: torch.dtype, *, terms: int, scale: float | Tensor, depth: int = 1) -> float:
    """Worst-case |a - b| between two orderings of `depth` chained sums of `terms` terms of magnitude `scale`."""
    if isinstance(scale, Tensor):  # an empty tensor (a rank with no rows) has nothing to bound: scale 0
        scale = float(scale.detach().abs().max()) if scale.numel() else 0.0
    scale = abs(float(scale))
    return 2.0 * depth * max(terms, 1) * unit_roundoff(dtype) * max(scale, torch.finfo(dtype).tiny)


def assert_close_rounding(
    actual: Tensor,
    expected: Tensor,
    *,
    terms: int,
    depth: int = 1,
    scale: float | Tensor | None = None,
    msg: str | None = None,
) -> None:
    """`actual == expected` up to reordering error (see the module docstring); `scale` defaults to max|expected|.

    The comparison runs in the reference's dtype (rounding of the lower-precision side is what is bounded).
    """
    dtype = expected.dtype if expected.is_floating_point() else torch.float32
    scale = expected if scale is None else scale
    atol = rounding_atol(dtype, terms=terms, scale=scale, depth=depth)
    prefix = f"{msg}: " if msg else ""
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0.0,
        atol=atol,
        check_dtype=False,
        msg=lambda m: f"{prefix}{m}\n(tolerance: terms={terms}, depth={depth}, atol={atol:.3g})",
    )


def assert_equal(actual: Tensor, expected: Tensor, *, msg: str | None = None) -> None:
    """Bitwise equality, for results exact by construction (same kernels, shapes and process; integers; copies)."""
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0.0,
        atol=0.0,
        equal_nan=True,
        msg=None if msg is None else lambda m: f"{msg}: {m}",
    )

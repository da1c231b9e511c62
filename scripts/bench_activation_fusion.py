"""Does fusing the expert SwiGLU into one pass pay on this machine? The layer's eager activation vs an inductor-fused one.

    .venv/bin/python scripts/bench_activation_fusion.py --json bench_results/activation_fusion.json

The MoE layer's SwiGLU (`automoe.moe.activations.FusedActivation`: 2 elementwise passes forward, 5 in backward,
recomputing from the saved pre-activation h [N, 2F]) against the same computation written as two functions
compiled by `torch.compile` (inductor: one generated loop each, math in fp32, one rounding to the output dtype).
Per shape and dtype it prints the median ms of forward + backward (interleaved rounds), the compile time, the
largest difference to the eager outputs, and both as a share of the layer's GEMM floor (six products of the
routed rows, timed here as 6 x one [N, D] x [D, 2F] product: the up projection is the largest). The shapes are
`scripts/bench_moe_layer.py`'s (T=4096, D=512): default E=8 k=2 F=1024 (N=8192 rows) and fine E=64 k=8 F=256
(N=32768 rows).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from automoe.bench import (
    DTYPES,
    MachineLoadMeter,
    add_host_allocator_flag,
    median_ms_interleaved,
    new_report,
    report_and_save,
)
from automoe.host_memory import apply_host_allocator
from automoe.moe.activations import FusedActivation

SHAPES = {"default": (8192, 1024), "fine": (32768, 256)}  # name -> (rows N = T * k, expert hidden F)
DIM = 512


def _swiglu_fwd(h_NU: torch.Tensor) -> torch.Tensor:
    g, u = h_NU.float().chunk(2, -1)
    return (F.silu(g) * u).to(h_NU.dtype)


def _swiglu_bwd(h_NU: torch.Tensor, da_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh_NU, a_NF) from h and the gradient of a = silu(g) * u: d/dg silu(g) = s (1 + g (1 - s))."""
    g, u = h_NU.float().chunk(2, -1)
    da = da_NF.float()
    s = torch.sigmoid(g)
    silu = g * s
    dg = da * u * s * (1 + g * (1 - s))
    return torch.cat([dg, da * silu], -1).to(h_NU.dtype), (silu * u).to(h_NU.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs both rows once)")
    add_host_allocator_flag(p)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    print(apply_host_allocator(args.host_allocator))
    eager_act = FusedActivation("swiglu")
    fused_fwd = torch.compile(_swiglu_fwd, dynamic=True)
    fused_bwd = torch.compile(_swiglu_bwd, dynamic=True)
    report = new_report(args)
    print(
        f"{'shape':<8} {'dtype':<5} {'eager ms':>9} {'fused ms':>9} {'fused/eager':>11} {'floor ms':>9} "
        f"{'eager/floor':>11} {'fused/floor':>11} {'compile s':>9} {'max |diff|':>10}"
    )
    with MachineLoadMeter() as machine:
        for dtype_name in args.dtype.split(","):
            dtype = DTYPES[dtype_name]
            for shape in args.shapes.split(","):
                N, Fd = SHAPES[shape]
                gen = torch.Generator().manual_seed(0)
                h = torch.randn(N, 2 * Fd, generator=gen).to(dtype)
                da = torch.randn(N, Fd, generator=gen).to(dtype)
                x = torch.randn(N, DIM, generator=gen).to(dtype)
                w = torch.randn(DIM, 2 * Fd, generator=gen).to(dtype)
                t0 = time.perf_counter()
                a_fused, (dh_fused, _) = fused_fwd(h), fused_bwd(h, da)
                compile_s = time.perf_counter() - t0
                a_eager = eager_act.forward(h)
                dh_eager, _ = eager_act.backward(h, da.clone())
                diff = max(
                    (a_fused.float() - a_eager.float()).abs().max().item(),
                    (dh_fused.float() - dh_eager.float()).abs().max().item(),
                )

                def eager(h=h, da=da) -> None:
                    eager_act.forward(h)
                    eager_act.backward(h, da.clone())

                def fused(h=h, da=da) -> None:
                    fused_fwd(h)
                    fused_bwd(h, da)

                def gemm(x=x, w=w) -> None:
                    torch.mm(x, w)

                med = median_ms_interleaved({"eager": eager, "fused": fused, "gemm": gemm}, args.rounds)
                eager_ms, fused_ms, floor_ms = med["eager"], med["fused"], 6 * med["gemm"]
                row = {
                    "shape": shape,
                    "dtype": dtype_name,
                    "rows": N,
                    "inter_dim": Fd,
                    "eager_ms": round(eager_ms, 2),
                    "fused_ms": round(fused_ms, 2),
                    "fused_over_eager": round(fused_ms / eager_ms, 3),
                    "floor_ms": round(floor_ms, 1),
                    "eager_over_floor": round(eager_ms / floor_ms, 3),
                    "fused_over_floor": round(fused_ms / floor_ms, 3),
                    "compile_s": round(compile_s, 1),
                    "max_abs_diff": diff,
                }
                report["rows"].append(row)
                print(
                    f"{shape:<8} {dtype_name:<5} {eager_ms:>9.1f} {fused_ms:>9.1f} {row['fused_over_eager']:>11.2f} "
                    f"{floor_ms:>9.1f} {row['eager_over_floor']:>11.3f} {row['fused_over_floor']:>11.3f} "
                    f"{compile_s:>9.1f} {diff:>10.2e}"
                )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

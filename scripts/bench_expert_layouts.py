"""The six expert GEMMs of one MoE step in two weight layouts, per expert and as the benchmark's dense floor.

    .venv/bin/python scripts/bench_expert_layouts.py --json bench_results/expert_layouts.json

The GEMMs of a SwiGLU expert step (forward X·W13, A·W2; backward dY·W2ᵀ, Aᵀ·dY, dH·W13ᵀ, Xᵀ·dH), timed four ways in
interleaved rounds (medians), on `scripts/bench_moe_layer.py`'s shapes with balanced rows (T·k/E rows per expert):
- `per_expert_in_out`: one `torch.mm` per expert and product with weights stored `[E, in, out]` (automoe's
  layout; the `split` engine);
- `per_expert_out_in`: the same with weights stored `[E, out, in]` and `F.linear` forward, weight gradients
  `[out, in]`, as a loop of `nn.Linear` calls does (the benchmark's `peer_loop`);
- `floor_in_out`: one dense product per GEMM over all T·k rows, `[in, out]` (the `floor` row of bench_moe_layer);
- `floor_out_in`: the same in the `[out, in]` layout.
Each is also printed as a ratio to `floor_in_out`. No activation, routing or autograd: inputs are random.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from automoe.bench import (
    DTYPES,
    MOE_LAYER_SHAPES,
    MachineLoadMeter,
    add_host_allocator_flag,
    median_ms_interleaved,
    new_report,
    report_and_save,
)
from automoe.host_memory import apply_host_allocator

SHAPES = MOE_LAYER_SHAPES  # name -> (E, k, F)


def _formulations(E: int, rows: int, D: int, Fd: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    X, A, dY, dH = rnd(E, rows, D), rnd(E, rows, Fd), rnd(E, rows, D), rnd(E, rows, 2 * Fd)
    W13, W2 = rnd(E, D, 2 * Fd), rnd(E, Fd, D)
    W13t, W2t = W13.transpose(1, 2).contiguous(), W2.transpose(1, 2).contiguous()
    Xf, Af, dYf, dHf = (t.reshape(-1, t.shape[-1]) for t in (X, A, dY, dH))

    def per_expert_in_out() -> None:
        for e in range(E):
            torch.mm(X[e], W13[e]), torch.mm(A[e], W2[e])
            torch.mm(dY[e], W2[e].t()), torch.mm(A[e].t(), dY[e])
            torch.mm(dH[e], W13[e].t()), torch.mm(X[e].t(), dH[e])

    def per_expert_out_in() -> None:
        for e in range(E):
            F.linear(X[e], W13t[e]), F.linear(A[e], W2t[e])
            torch.mm(dY[e], W2t[e]), torch.mm(dY[e].t(), A[e])
            torch.mm(dH[e], W13t[e]), torch.mm(dH[e].t(), X[e])

    def floor_in_out() -> None:
        torch.mm(Xf, W13[0]), torch.mm(Af, W2[0])
        torch.mm(dYf, W2[0].t()), torch.mm(Af.t(), dYf)
        torch.mm(dHf, W13[0].t()), torch.mm(Xf.t(), dHf)

    def floor_out_in() -> None:
        F.linear(Xf, W13t[0]), F.linear(Af, W2t[0])
        torch.mm(dYf, W2t[0]), torch.mm(dYf.t(), Af)
        torch.mm(dHf, W13t[0]), torch.mm(dHf.t(), Xf)

    return {
        "per_expert_in_out": per_expert_in_out,
        "per_expert_out_in": per_expert_out_in,
        "floor_in_out": floor_in_out,
        "floor_out_in": floor_out_in,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--shapes", default="default,fine", help=f"comma-separated of {list(SHAPES)}")
    p.add_argument("--tokens", type=int, default=4096, help="tokens T per step")
    p.add_argument("--dim", type=int, default=512, help="model dim D")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    add_host_allocator_flag(p)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    print(apply_host_allocator(args.host_allocator))
    report = new_report(args)
    print(f"{'shape':<8} {'dtype':<5} {'formulation':<18} {'median ms':>10} {'/ floor_in_out':>14}")
    with MachineLoadMeter() as machine:
        for dtype_name in args.dtype.split(","):
            for shape in args.shapes.split(","):
                E, k, Fd = SHAPES[shape]
                fns = _formulations(E, args.tokens * k // E, args.dim, Fd, DTYPES[dtype_name])
                med = median_ms_interleaved(fns, args.rounds)
                for name in fns:
                    ratio = med[name] / med["floor_in_out"]
                    report["rows"].append(
                        {
                            "shape": shape,
                            "dtype": dtype_name,
                            "formulation": name,
                            "median_ms": round(med[name], 2),
                            "over_floor_in_out": round(ratio, 3),
                        }
                    )
                    print(f"{shape:<8} {dtype_name:<5} {name:<18} {med[name]:>10.1f} {ratio:>14.3f}")
    print(f"cpu: {report['machine']['cpu']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

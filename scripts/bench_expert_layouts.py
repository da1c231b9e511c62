"""The six expert GEMMs of one MoE step, formulated every way the engines can, against the benchmark's dense floor.

    .venv/bin/python scripts/bench_expert_layouts.py --json bench_results/expert_layouts.json
    .venv/bin/python scripts/bench_expert_layouts.py --noise 0,1 --shapes default,fine,e128 --dtype bf16

The GEMMs of a SwiGLU expert step (forward X·W13, A·W2; backward dY·W2ᵀ, Aᵀ·dY, dH·W13ᵀ, Xᵀ·dH), timed in
interleaved rounds (medians), on `scripts/bench_moe_layer.py`'s shapes. Rows per expert: T·k/E each (`--noise 0`),
or the counts `bench_moe_layer`'s skewed routing draws (`--noise 1`, the fake gate's first round):
- `per_expert_in_out`: one `torch.mm` per expert and product with weights stored `[E, in, out]` (automoe's
  layout; the `split` engine);
- `per_expert_out_in`: the same with weights stored `[E, out, in]` and `F.linear` forward, weight gradients
  `[out, in]`, as a loop of `nn.Linear` calls does (the benchmark's `peer_loop`);
- `padded_bmm`: one `torch.bmm` per product over `[E, largest count, *]` (the `bmm` engine's GEMMs, without its
  padding copies);
- `grouped_mm`: torch's grouped GEMM over the ragged rows, where it runs for the dtype (the `grouped_mm` engine);
- `floor_in_out`: one dense product per GEMM over all T·k rows, `[in, out]` (the `floor` row of bench_moe_layer);
- `floor_out_in`: the same in the `[out, in]` layout.
Each is also printed as a ratio to `floor_in_out`: the smallest ratio of the non-floor rows is the best any of
these formulations of the per-expert products reaches. No activation, routing or autograd: inputs are random.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from automoe.bench import (
    DTYPES,
    MOE_LAYER_SHAPES,
    MachineLoadMeter,
    add_host_allocator_flag,
    fake_gate_moe,
    median_ms_interleaved,
    new_report,
    report_and_save,
)
from automoe.host_memory import apply_host_allocator
from automoe.moe.experts import _grouped_mm, grouped_mm_supported

SHAPES = MOE_LAYER_SHAPES  # name -> (E, k, F)


def _routed_counts(E: int, k: int, Fd: int, *, tokens: int, dim: int, noise: float) -> list[int]:
    """Rows per expert: T*k/E each for balanced routing, else the fake gate's draw (`bench_moe_layer`'s round 0)."""
    if noise == 0:
        return [tokens * k // E] * E
    layer = fake_gate_moe(E, k, Fd, dim=dim, dtype=torch.float32, noise=noise, backend="auto")
    torch.manual_seed(0)
    x_TD = torch.randn(tokens, dim)
    return torch.bincount(layer.gate(x_TD, None).indices_TK.flatten(), minlength=E).tolist()


def _formulations(counts: list[int], D: int, Fd: int, dtype: torch.dtype) -> dict:
    E, N = len(counts), sum(counts)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    Xf, Af, dYf, dHf = rnd(N, D), rnd(N, Fd), rnd(N, D), rnd(N, 2 * Fd)
    W13, W2 = rnd(E, D, 2 * Fd), rnd(E, Fd, D)
    W13t, W2t = W13.transpose(1, 2).contiguous(), W2.transpose(1, 2).contiguous()
    ends = torch.tensor(counts).cumsum(0).tolist()
    ranges = [(lo, hi) for lo, hi in zip([0, *ends[:-1]], ends) if hi > lo]
    X, A, dY, dH = ([t[lo:hi] for lo, hi in ranges] for t in (Xf, Af, dYf, dHf))
    experts = [e for e, c in enumerate(counts) if c > 0]
    cap = max(counts)  # padded bmm: every expert padded to the largest count (a view when balanced)
    Xp, Ap, dYp, dHp = (rnd(E, cap, t.shape[-1]) for t in (Xf, Af, dYf, dHf))
    offs = torch.tensor(ends, dtype=torch.int32)

    def per_expert_in_out() -> None:
        for i, e in enumerate(experts):
            torch.mm(X[i], W13[e]), torch.mm(A[i], W2[e])
            torch.mm(dY[i], W2[e].t()), torch.mm(A[i].t(), dY[i])
            torch.mm(dH[i], W13[e].t()), torch.mm(X[i].t(), dH[i])

    def per_expert_out_in() -> None:
        for i, e in enumerate(experts):
            F.linear(X[i], W13t[e]), F.linear(A[i], W2t[e])
            torch.mm(dY[i], W2t[e]), torch.mm(dY[i].t(), A[i])
            torch.mm(dH[i], W13t[e]), torch.mm(dH[i].t(), X[i])

    def padded_bmm() -> None:
        torch.bmm(Xp, W13), torch.bmm(Ap, W2)
        torch.bmm(dYp, W2.transpose(1, 2)), torch.bmm(Ap.transpose(1, 2), dYp)
        torch.bmm(dHp, W13.transpose(1, 2)), torch.bmm(Xp.transpose(1, 2), dHp)

    def grouped_mm() -> None:
        _grouped_mm(Xf, W13, offs=offs), _grouped_mm(Af, W2, offs=offs)
        _grouped_mm(dYf, W2.transpose(1, 2), offs=offs), _grouped_mm(Af.t(), dYf, offs=offs)
        _grouped_mm(dHf, W13.transpose(1, 2), offs=offs), _grouped_mm(Xf.t(), dHf, offs=offs)

    def floor_in_out() -> None:
        torch.mm(Xf, W13[0]), torch.mm(Af, W2[0])
        torch.mm(dYf, W2[0].t()), torch.mm(Af.t(), dYf)
        torch.mm(dHf, W13[0].t()), torch.mm(Xf.t(), dHf)

    def floor_out_in() -> None:
        F.linear(Xf, W13t[0]), F.linear(Af, W2t[0])
        torch.mm(dYf, W2t[0]), torch.mm(dYf.t(), Af)
        torch.mm(dHf, W13t[0]), torch.mm(dHf.t(), Xf)

    fns = {
        "per_expert_in_out": per_expert_in_out,
        "per_expert_out_in": per_expert_out_in,
        "padded_bmm": padded_bmm,
        "floor_in_out": floor_in_out,
        "floor_out_in": floor_out_in,
    }
    if _grouped_mm is not None and grouped_mm_supported(Xf.device, dtype, dim=D, hidden=Fd):
        fns["grouped_mm"] = grouped_mm
    return fns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--shapes", default="default,fine", help=f"comma-separated of {list(SHAPES)}")
    p.add_argument("--tokens", type=int, default=4096, help="tokens T per step")
    p.add_argument("--dim", type=int, default=512, help="model dim D")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument(
        "--noise",
        default="0",
        help="comma-separated fake gate noise: 0 balanced rows, 1 the rows bench_moe_layer's skewed routing draws",
    )
    add_host_allocator_flag(p)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    print(apply_host_allocator(args.host_allocator))
    report = new_report(args)
    print(
        f"{'shape':<8} {'dtype':<5} {'noise':>5} {'formulation':<18} {'median ms':>10} {'/ floor_in_out':>14}"
    )
    with MachineLoadMeter() as machine:
        for dtype_name in args.dtype.split(","):
            for shape, noise in itertools.product(args.shapes.split(","), map(float, args.noise.split(","))):
                E, k, Fd = SHAPES[shape]
                counts = _routed_counts(E, k, Fd, tokens=args.tokens, dim=args.dim, noise=noise)
                fns = _formulations(counts, args.dim, Fd, DTYPES[dtype_name])
                med = median_ms_interleaved(fns, args.rounds)
                for name in fns:
                    ratio = med[name] / med["floor_in_out"]
                    report["rows"].append(
                        {
                            "shape": shape,
                            "dtype": dtype_name,
                            "noise": noise,
                            "max_over_mean_rows": round(max(counts) * len(counts) / sum(counts), 3),
                            "formulation": name,
                            "median_ms": round(med[name], 2),
                            "over_floor_in_out": round(ratio, 3),
                        }
                    )
                    print(
                        f"{shape:<8} {dtype_name:<5} {noise:>5} {name:<18} {med[name]:>10.1f} {ratio:>14.3f}"
                    )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

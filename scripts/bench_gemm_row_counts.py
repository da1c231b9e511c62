"""What a GEMM's first call at a new row count costs: the same products with one row count, with a new count each
call, and with those counts again.

    .venv/bin/python scripts/bench_gemm_row_counts.py --json bench_results/gemm_row_counts.json

Per-expert GEMMs under learned (or random) routing see a different row count every step. On the CPU, torch runs
bf16 products through oneDNN, which builds (and caches) a kernel per shape: a count it has not met pays that
build. A long run meets the same counts again (the cache keeps 1024 shapes by default), a benchmark round with a
fresh routing draw meets new ones on every expert. Each pass is `calls` products (rows x dim) @ (dim x dim), with
the rows spread evenly around dim, so the mean work equals the one-count case:
- `one_count`: every call at dim rows (warm: timed after one untimed pass);
- `new_counts`: each call a count this process has not used yet;
- `same_counts_again`: the `new_counts` sequence once more (its shapes now cached).
Every round uses its own counts (round r: dim - calls*rounds/2 + r + rounds*i), so `new_counts` is always new.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from automoe.bench import DTYPES, MachineLoadMeter, new_report, report_and_save


def _time_ms(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> float:
    t0 = time.perf_counter()
    for m in counts:
        torch.mm(x[:m], w)
    return (time.perf_counter() - t0) * 1e3


def measure(dtype: torch.dtype, *, dim: int, calls: int, rounds: int) -> dict[str, float]:
    """Median ms per `calls` products for each case (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    lowest = dim - calls * rounds // 2
    if lowest < 1:
        raise ValueError(f"--calls {calls} x --rounds {rounds} needs --dim above {calls * rounds // 2}")
    x = torch.randn(dim + calls * rounds, dim, generator=gen).to(dtype)
    w = torch.randn(dim, dim, generator=gen).to(dtype)
    one = [dim] * calls
    _time_ms(x, w, one)
    times: dict[str, list[float]] = {"one_count": [], "new_counts": [], "same_counts_again": []}
    for r in range(rounds):
        new = [lowest + r + rounds * i for i in range(calls)]  # mean about dim; no other round uses these
        times["one_count"].append(_time_ms(x, w, one))
        times["new_counts"].append(_time_ms(x, w, new))
        times["same_counts_again"].append(_time_ms(x, w, new))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16,fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--dim", type=int, default=512, help="inner and output width of each product")
    p.add_argument("--calls", type=int, default=200, help="products per timed pass")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each with a fresh range of counts)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    report = new_report(args)
    print(f"{'dtype':<6} {'one count ms':>13} {'new counts ms':>14} {'same again ms':>14} {'new / one':>10}")
    with MachineLoadMeter() as machine:
        for name in args.dtype.split(","):
            ms = measure(DTYPES[name], dim=args.dim, calls=args.calls, rounds=args.rounds)
            ratio = ms["new_counts"] / ms["one_count"]
            report["rows"].append(
                {"dtype": name, **{k: round(v, 2) for k, v in ms.items()}, "new_over_one": round(ratio, 2)}
            )
            print(
                f"{name:<6} {ms['one_count']:>13.1f} {ms['new_counts']:>14.1f} {ms['same_counts_again']:>14.1f}"
                f" {ratio:>10.2f}"
            )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

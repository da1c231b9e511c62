"""Measured matmul peak of this machine (GFLOP/s) per dtype and process x thread layout: the MFU denominator.

    .venv/bin/python scripts/bench_matmul_peak.py --json bench_results/matmul_peak.json

Layouts: `1x1` one process with one thread, `1x2` one process with two threads, `2x1` two processes with one
thread each running at the same time (what `torchrun --nproc-per-node 2` gives the trainer; the aggregate is
reported). For each (dtype, layout, shape): the median and the best of --repeats timed bursts of --iters
products. `peak` per (dtype, layout) is the best burst over the shapes: the rate the CPU reached, so MFU against
it is conservative on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics

from automoe.bench import (
    DTYPES,
    MATMUL_LAYOUTS,
    MachineLoadMeter,
    matmul_gflops,
    new_report,
    report_and_save,
)

SHAPES = [(4096, 512, 1024), (2048, 2048, 2048), (8192, 512, 2048)]  # (M, K, N) of (M x K) @ (K x N)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--layouts", default="1x1,1x2,2x1", help="processes x threads, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed bursts per (dtype, layout, shape)")
    p.add_argument("--iters", type=int, default=4, help="products per burst")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    report = new_report(args, peak_gflops={})
    print(f"{'dtype':<5} {'layout':<6} {'shape (MxK @ KxN)':<22} {'median GFLOP/s':>14} {'best':>8}")
    with MachineLoadMeter() as machine:
        for dtype_name in args.dtype.split(","):
            if dtype_name not in DTYPES:
                raise ValueError(f"--dtype {dtype_name!r} is not one of {list(DTYPES)}")
            for layout in args.layouts.split(","):
                if layout not in MATMUL_LAYOUTS:
                    raise ValueError(f"--layouts entry {layout!r} is not one of 1x1, 1x2, 2x1")
                best = 0.0
                for shape in SHAPES:
                    rates = matmul_gflops(dtype_name, shape, layout, repeats=args.repeats, iters=args.iters)
                    row = {
                        "dtype": dtype_name,
                        "layout": layout,
                        "shape": list(shape),
                        "median_gflops": round(statistics.median(rates), 1),
                        "best_gflops": round(max(rates), 1),
                    }
                    report["rows"].append(row)
                    best = max(best, row["best_gflops"])
                    M, K, N = shape
                    print(
                        f"{dtype_name:<5} {layout:<6} {f'{M}x{K} @ {K}x{N}':<22} "
                        f"{row['median_gflops']:>14.1f} {row['best_gflops']:>8.1f}"
                    )
                report["peak_gflops"][f"{dtype_name}/{layout}"] = best
    print(
        "peak (best burst over shapes): "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["peak_gflops"].items())
    )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

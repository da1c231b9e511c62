"""What `train.host_allocator` changes: page faults, step time and resident memory of MoE layer steps, per mode.

    .venv/bin/python scripts/bench_host_memory.py --json bench_results/host_memory.json
    .venv/bin/python scripts/bench_host_memory.py --shape fine --dtype bf16 --noise 1 --steps 30

Each mode (`system`: glibc's defaults; `cached`: freed blocks stay mapped, automoe.host_memory) runs in its own
child process (mallopt is process-wide and cannot be undone), the two alternating for --rounds rounds. A child runs
--steps forward + backward steps of one `automoe.moe.layer.MoE` (the shapes of scripts/bench_moe_layer.py: T=4096,
d=512, SwiGLU, the fake gate, `experts_backend=auto`) and records per step the minor page faults (exact, from
getrusage), the wall time and the resident set. Printed per mode: the median step ms after --warmup steps, page
faults per step (median after warm-up, and in the first step, which includes the autotuner's runs), and the
resident set at the end and at its peak. With --tcache-off a third process runs `cached` with glibc's per-thread
cache disabled (GLIBC_TUNABLES, which glibc reads only at process start): the cache keeps the small pieces that
aligned allocations split off, and those keep freed large blocks from merging.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from automoe.bench import (
    DTYPES,
    MOE_LAYER_SHAPES,
    MachineLoadMeter,
    fake_gate_moe,
    new_report,
    report_and_save,
)
from automoe.host_memory import TCACHE_OFF as TCACHE_OFF_TUNABLE

SHAPES = MOE_LAYER_SHAPES
MODES = ("system", "cached")
# a third row with --tcache-off: `cached` in a process started with glibc's per-thread cache disabled
TCACHE_OFF = "cached, tcache off"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> dict:
    """Runs in the child process: apply the mode first, then build and step the layer."""
    from automoe.host_memory import apply_host_allocator

    applied = apply_host_allocator(args.child)
    import torch

    dtype = DTYPES[args.dtype]
    layer = fake_gate_moe(*SHAPES[args.shape], dim=512, dtype=dtype, noise=args.noise, backend="auto")
    x = torch.randn(1, args.tokens, 512).to(dtype)
    dy = torch.randn(1, args.tokens, 512).to(dtype)
    steps = []
    for _ in range(args.steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for p in layer.parameters():
            p.grad = None
        layer(x.detach().requires_grad_()).backward(dy)
        steps.append(
            {
                "ms": (time.perf_counter() - t0) * 1e3,
                "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
                "rss_mb": _rss_mb(),
            }
        )
    return {
        "applied": applied,
        "steps": steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(args: argparse.Namespace, mode: str) -> dict:
    applied = "cached" if mode == TCACHE_OFF else mode
    cmd = [sys.executable, __file__, "--child", applied, "--shape", args.shape, "--dtype", args.dtype]
    cmd += ["--noise", str(args.noise), "--tokens", str(args.tokens), "--steps", str(args.steps)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if mode == TCACHE_OFF:
        env["GLIBC_TUNABLES"] = TCACHE_OFF_TUNABLE
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(mode: str, runs: list[dict], warmup: int) -> dict:
    after = [s for r in runs for s in r["steps"][warmup:]]
    return {
        "mode": mode,
        "applied": runs[0]["applied"],
        "step_ms": statistics.median(s["ms"] for s in after),
        "faults_per_step": statistics.median(s["faults"] for s in after),
        "faults_first_step": statistics.median(r["steps"][0]["faults"] for r in runs),
        "rss_end_mb": statistics.median(r["steps"][-1]["rss_mb"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="default", choices=list(SHAPES))
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--noise", type=float, default=0.0, help="fake_gate_noise: 0 balanced, 1 skewed")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16, help="layer steps per child process")
    p.add_argument("--warmup", type=int, default=6, help="steps left out of the medians (the heap settles)")
    p.add_argument("--rounds", type=int, default=2, help="child processes per mode, alternating")
    p.add_argument(
        "--tcache-off",
        action="store_true",
        help=f"also run `cached` with GLIBC_TUNABLES={TCACHE_OFF_TUNABLE} (glibc's per-thread cache off)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", default=None, choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None and args.warmup >= args.steps:  # the child steps; the parent takes the medians
        raise ValueError(f"--warmup {args.warmup} must be below --steps {args.steps}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    report = new_report(args)
    modes = (*MODES, TCACHE_OFF) if args.tcache_off else MODES
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with MachineLoadMeter() as machine:
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(run_child(args, mode))
    print(
        f"{args.shape} {args.dtype} noise={args.noise} T={args.tokens}: {args.rounds} x {args.steps} steps per mode"
    )
    print(f"{'mode':18} {'step ms':>8} {'faults/step':>12} {'faults step 1':>14} {'RSS end MB':>11} "
          f"{'peak RSS MB':>12}")  # fmt: skip
    for mode in modes:
        row = summarize(mode, runs[mode], args.warmup)
        report["rows"].append({**row, "runs": runs[mode]})
        print(
            f"{mode:18} {row['step_ms']:8.1f} {row['faults_per_step']:12.0f} {row['faults_first_step']:14.0f} "
            f"{row['rss_end_mb']:11.0f} {row['peak_rss_mb']:12.0f}"
        )
    system = report["rows"][0]
    for row in report["rows"][1:]:
        print(
            f"{row['mode']} / system: step time {row['step_ms'] / system['step_ms']:.3f}, "
            f"peak resident {row['peak_rss_mb'] / system['peak_rss_mb']:.3f}"
        )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

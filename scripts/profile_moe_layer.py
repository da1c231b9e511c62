"""Where one MoE layer step (forward + backward) spends its time: torch.profiler op counts and self times.

    .venv/bin/python scripts/profile_moe_layer.py --shape fine --dtype bf16
    .venv/bin/python scripts/profile_moe_layer.py --shape default --dtype fp32 --backend grouped_mm --table

Counts the passes beyond the GEMMs, grouped as in scripts/profile_train_step.py (GEMMs, index / permute / sort,
copies / casts, elementwise), for the shapes of scripts/bench_moe_layer.py (T=4096, d=512, fake balanced gate).
Self times are single-step and swing with machine load; the op counts are exact.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from automoe.bench import DTYPES, MOE_LAYER_SHAPES, add_host_allocator_flag, cpu_model, fake_gate_moe
from automoe.host_memory import apply_host_allocator

SHAPES = MOE_LAYER_SHAPES
GROUPS = [
    ("GEMMs", r"aten::(mm|addmm|bmm|_grouped_mm|matmul|linear)$"),
    ("index / permute / sort", r"index|gather|scatter|sort|bincount|cumsum|repeat_interleave|nonzero"),
    ("copies / casts / fills", r"aten::(copy_|clone|contiguous|to|_to_copy|cat|stack|fill_|zero_|zeros)$"),
    ("activation / elementwise", r"aten::(silu|silu_backward|mul|mul_|add|add_|sum|gelu|relu|sigmoid)"),
]


def group_of(name: str) -> str | None:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="default", choices=list(SHAPES))
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backend", default="auto", help="experts_backend")
    p.add_argument("--noise", type=float, default=0.0, help="fake_gate_noise (0 balanced, 1 skewed)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--table", action="store_true", help="also print torch.profiler's op table")
    add_host_allocator_flag(p)
    args = p.parse_args()
    print(apply_host_allocator(args.host_allocator))
    D, dtype = 512, DTYPES[args.dtype]
    layer = fake_gate_moe(*SHAPES[args.shape], dim=D, dtype=dtype, noise=args.noise, backend=args.backend)
    x = torch.randn(1, args.tokens, D).to(dtype)
    dy = torch.randn(1, args.tokens, D).to(dtype)

    def step() -> None:
        for param in layer.parameters():
            param.grad = None
        layer(x.detach().requires_grad_()).backward(dy)

    for _ in range(2):  # warm-up (and autotuning)
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    calls: dict[str, int] = defaultdict(int)
    ms: dict[str, float] = defaultdict(float)
    ops: dict[str, list[str]] = defaultdict(list)
    for e in events:
        group = group_of(e.key)
        if group is None:
            continue
        calls[group] += e.count
        ms[group] += e.self_cpu_time_total / 1e3
        ops[group].append(f"{e.key.removeprefix('aten::')} x{e.count}")
    print(
        f"{args.shape} {args.dtype} backend={args.backend} noise={args.noise} T={args.tokens}: {cpu_model()}, "
        f"loadavg {os.getloadavg()[0]:.1f}; one step {total_ms:.0f} ms self CPU"
    )
    print(f"{'group':<26} {'calls':>6} {'ms':>8} {'share':>6}  ops")
    for group, _ in GROUPS:
        print(
            f"{group:<26} {calls[group]:>6} {ms[group]:>8.1f} {ms[group] / total_ms:>6.1%}  "
            + ", ".join(sorted(ops[group]))
        )
    if args.table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))


if __name__ == "__main__":
    main()

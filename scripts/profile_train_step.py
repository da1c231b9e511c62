"""Where a training step's time goes: torch.profiler over whole `Trainer.train_step`s, grouped into phases.

    torchrun --standalone --nproc-per-node 2 scripts/profile_train_step.py --model qwen3_debug --steps 2 \
        --json bench_results/profile_ep2.json -- parallel=ep2
    torchrun --standalone --nproc-per-node 1 scripts/profile_train_step.py --model qwen3_debug -- parallel=single

Runs `--warmup` untimed steps, then profiles `--steps` steps on every rank and prints rank 0's table: wall ms per
step of each phase, from the profiler's user scopes (optimizer step, FSDP collectives) and the self time of the
aten/c10d ops inside them (GEMMs, all-to-all, elementwise). Models: those of scripts/bench_trainer.py. Anything
after `--` is a Hydra override of the recipe's config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
# phase -> op-name patterns (self time of matching ops; the first matching phase wins)
PHASES = [
    ("optimizer (AdamW)", r"adam|Optimizer\.step|_foreach_"),
    ("all-to-all", r"all_to_all|alltoall"),
    ("FSDP / other collectives", r"all_gather|reduce_scatter|allreduce|all_reduce|broadcast|c10d|gloo|FSDP"),
    ("GEMMs", r"aten::(mm|addmm|bmm|_grouped_mm|matmul|linear)$"),
    ("attention", r"scaled_dot_product|flash|_efficient_attention|flex"),
    (
        "index / permute / sort",
        r"index|gather|scatter|sort|argsort|bincount|cumsum|repeat_interleave|nonzero|where",
    ),
    ("copies / casts", r"aten::(copy_|clone|contiguous|to|_to_copy|cat|stack)$"),
    ("elementwise / other aten", r"aten::"),
]


def _bench_trainer():
    spec = importlib.util.spec_from_file_location("bench_trainer", REPO / "scripts" / "bench_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def phase_of(name: str) -> str:
    for phase, pattern in PHASES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return phase
    return "python / other"


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_debug", help="a model preset of scripts/bench_trainer.py")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--json", default=None, help="write rank 0's phase table here")
    args = p.parse_args(argv)
    bt = _bench_trainer()
    from automoe.bench import machine_info
    from automoe.parallel import init_distributed
    from automoe.train.build import build_trainer

    tmp = tempfile.mkdtemp(prefix="profile_step_")
    cfg = bt.compose(
        [
            *bt.common_overrides(steps=args.warmup + args.steps, model=args.model),
            f"output_dir={tmp}",
            *overrides,
        ]
    )
    env = init_distributed(timeout_s=600)
    trainer = build_trainer(cfg, env)
    for _ in range(args.warmup):
        trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        records = [trainer.train_step() for _ in range(args.steps)]
    self_us: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        self_us[phase_of(evt.key)] += evt.self_cpu_time_total
    step_ms = sum(r["step_time_s"] for r in records) / len(records) * 1e3
    table = {k: v / 1e3 / args.steps for k, v in sorted(self_us.items(), key=lambda kv: -kv[1])}
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    if env.rank == 0:
        print(
            f"world {env.world_size}, threads {torch.get_num_threads()}, step {step_ms:.0f} ms (wall, median-free mean)"
        )
        print(f"{'phase':<28} {'ms/step':>9} {'share':>6}")
        total = sum(table.values())
        for k, v in table.items():
            print(f"{k:<28} {v:>9.1f} {v / total:>6.1%}")
        print(
            "top ops (self ms/step): "
            + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / args.steps:.0f}" for e in top)
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(
                json.dumps(
                    {
                        "machine": machine_info(),
                        "loadavg": os.getloadavg(),
                        "world": env.world_size,
                        "overrides": overrides,
                        "model": args.model,
                        "step_ms": step_ms,
                        "tokens_per_s": [r["tokens_per_s"] for r in records],
                        "phases_ms_per_step": table,
                        "top_ops_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in top},
                    },
                    indent=2,
                )
            )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

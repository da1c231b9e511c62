"""Trainer throughput (tokens/s) and model FLOPs utilization for EP=1 vs EP=2 on the same cores and global batch.

    .venv/bin/python scripts/bench_trainer.py --json bench_results/trainer.json
    .venv/bin/python scripts/bench_trainer.py --model small --dtype float32,bfloat16 --steps 12 --warmup 4

Each run is the real recipe, `torchrun --standalone --nproc-per-node 2 recipes/pretrain.py` on synthetic data
with validation, checkpoints, heatmap and wandb off. Layouts: `ep1` = `parallel=single` (2-way FSDP data
parallel, every rank holds all experts), `ep2` = `parallel=ep2` (experts sharded over 2 ranks by all-to-all,
dense params FSDP). Runs alternate between layouts (--repeats rounds) so load bursts from other jobs hit both.

tokens/s: the median of `tokens_per_s` in metrics.jsonl over steps after --warmup, then the median over rounds.
Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 * N + 12 * L * H * Q * S, where N is the
active parameter count per token (K routed experts + shared + dense + router + output head; the input
embedding is a lookup and is excluded unless tied to the head), L layers, H heads, Q head dim, S sequence length
(attention scores over the full S x S, not halved for the causal mask). MFU = tokens/s * FLOPs/token / peak,
with the peak measured here for the same dtype and layout (2 processes x 1 thread; `bench_matmul_peak.py`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from automoe.bench import MachineLoadMeter, machine_info, matmul_gflops, report_and_save
from automoe.torchrun import torchrun_command

REPO = Path(__file__).resolve().parents[1]

# name -> (processes, overrides, OMP threads per process or None for torchrun's choice); `one` is a single process
# with 2 threads (torchrun sets 1 thread per process only when it starts more than one), `one1` the same with 1
# thread: the pair measures how well one process uses the second core, which bounds what EP=2 can gain over `one`
# (each EP rank runs at most half the work on one thread: EP=2 / one <= 2 x tokens/s(one1) / tokens/s(one))
LAYOUTS = {
    "ep1": (2, ["parallel=single"], None),
    "ep2": (2, ["parallel=ep2"], None),
    "one": (1, ["parallel=single"], None),
    "one1": (1, ["parallel=single"], 1),
}
MODELS = {
    "tiny": [],  # configs/model/tiny.yaml: dim 128, 4 layers, 8 experts top-2 + 1 shared
    "small": [
        "model.dim=256",
        "model.num_layers=6",
        "model.ffn_inter_dim=1024",
        "model.moe.moe_inter_dim=256",
    ],
    # issue 17's Qwen3-MoE debug shape: 315.76M parameters (51.5M active), 8 layers of 64 experts top-8;
    # run it with --global-batch 8 (1024 tokens per step)
    "qwen3_debug": [
        "model=qwen3_30b_a3b",
        "model.dim=256",
        "model.num_layers=8",
        "model.num_heads=16",
        "model.num_kv_heads=8",
        "model.head_dim=128",
        "model.vocab_size=2048",
        "model.max_seq_len=128",
        "model.moe.num_experts=64",
        "model.moe.num_activated_experts=8",
        "model.moe.moe_inter_dim=768",
    ],
}
# the same shape with every token routed evenly (`fake_balanced` gate, no aux loss): the cost of the layouts
# without routing skew. The learned router of `qwen3_debug` on synthetic tokens collapses within a few steps
# (MaxVio 6-7 by step 3), and under EP that skew becomes one rank's work while the other waits.
MODELS["qwen3_debug_balanced"] = [
    *MODELS["qwen3_debug"],
    "model.moe.gate=fake_balanced",
    "model.moe.aux_loss_coeff=0",
]
PEAK_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def common_overrides(*, steps: int, model: str, global_batch: int = 16, micro_batch: int = 4) -> list[str]:
    """The recipe overrides every benchmarked run shares: synthetic data, no validation/checkpoints/wandb."""
    return [
        "data=synthetic",
        f"train.steps={steps}",
        f"train.global_batch_size={global_batch}",
        f"train.micro_batch_size={micro_batch}",
        "train.val_interval=0",
        "checkpoint.interval=0",
        "logging.heatmap=false",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        *MODELS[model],
    ]


def compose(overrides: list[str]):
    """The typed JobConfig the recipe would see for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from automoe.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))


def flops_per_token(cfg) -> dict:
    """Model FLOPs per trained token (forward + backward), PaLM formula; see the module docstring."""
    from automoe.models import num_params

    m = cfg.model
    counts = num_params(m)
    embedding = 0 if m.tie_embeddings else m.vocab_size * m.dim
    head_dim = m.head_dim or m.dim // m.num_heads
    dense = 6 * (counts.active - embedding)
    attention = 12 * m.num_layers * m.num_heads * head_dim * cfg.data.seq_len
    return {
        "params_total": counts.total,
        "params_active": counts.active,
        "params_active_non_embedding": counts.active - embedding,
        "flops_per_token": dense + attention,
        "attention_share": round(attention / (dense + attention), 3),
    }


def run_once(
    overrides: list[str], *, nproc: int, out_dir: Path, timeout_s: int, threads: int | None = None
) -> list[dict]:
    """Run the recipe once; -> its metrics.jsonl records."""
    cmd = torchrun_command(nproc, REPO / "recipes" / "pretrain.py", *overrides, f"output_dir={out_dir}")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun then sets 1 per process
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS), help="model preset")
    p.add_argument("--dtype", default="float32", help="comma-separated train.dtype values: float32, bfloat16")
    p.add_argument(
        "--layouts",
        default="ep1,ep2",
        help="comma-separated: ep1, ep2, one (1 process x 2 threads), one1 (1 process x 1 thread)",
    )
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the throughput")
    p.add_argument("--repeats", type=int, default=2, help="rounds; each runs every layout once")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step (seq_len 128)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank and forward")
    p.add_argument("--peak-repeats", type=int, default=5, help="matmul bursts for the peak (0: use --peak)")
    p.add_argument("--peak", default=None, help="JSON from bench_matmul_peak.py to take the peaks from")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.steps <= args.warmup:
        raise ValueError(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    dtypes = args.dtype.split(",")
    for d in dtypes:
        if d not in PEAK_DTYPE:
            raise ValueError(f"--dtype {d!r} is not one of {list(PEAK_DTYPE)}")
    layouts = args.layouts.split(",")
    for name in layouts:
        if name not in LAYOUTS:
            raise ValueError(f"--layouts entry {name!r} is not one of {list(LAYOUTS)}")
    common = common_overrides(
        steps=args.steps, model=args.model, global_batch=args.global_batch, micro_batch=args.micro_batch
    )
    cfg = compose(common)
    flops = flops_per_token(cfg)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "overrides": common,
        "model": flops,
        "peak_gflops": {},
        "runs": [],
        "summary": [],
    }
    # the MFU denominator: 2 processes x 1 thread, as torchrun runs the trainer
    if args.peak:
        report["peak_gflops"] = json.loads(Path(args.peak).read_text())["peak_gflops"]
    for d in dtypes:
        key = f"{PEAK_DTYPE[d]}/2x1"
        if key not in report["peak_gflops"]:
            best = max(
                max(matmul_gflops(PEAK_DTYPE[d], shape, "2x1", repeats=args.peak_repeats, iters=4))
                for shape in ((4096, 512, 1024), (2048, 2048, 2048))
            )
            report["peak_gflops"][key] = round(best, 1)
    with MachineLoadMeter() as machine, tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        for r in range(args.repeats):
            for d in dtypes:
                for name in layouts:
                    out_dir = Path(tmp) / f"{name}_{d}_{r}"
                    t0 = time.perf_counter()
                    nproc, layout, threads = LAYOUTS[name]
                    with MachineLoadMeter() as load:
                        records = run_once(
                            [*common, *layout, f"train.dtype={d}"],
                            nproc=nproc,
                            out_dir=out_dir,
                            timeout_s=args.timeout,
                            threads=threads,
                        )
                    timed = [rec for rec in records if rec["step"] > args.warmup]
                    run = {
                        "layout": name,
                        "dtype": d,
                        "round": r,
                        "tokens_per_s": round(statistics.median(rec["tokens_per_s"] for rec in timed), 1),
                        "step_s": round(statistics.median(rec["step_time_s"] for rec in timed), 4),
                        "final_loss": round(records[-1]["loss"], 4),
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "machine_busy": round(load.busy, 3),
                    }
                    report["runs"].append(run)
                    print(
                        f"round {r} {name} {d}: {run['tokens_per_s']:.0f} tok/s, step {run['step_s'] * 1e3:.0f} ms, "
                        f"loss {run['final_loss']:.3f}, wall {run['wall_s']:.0f} s, machine busy {load.busy:.0%}",
                        flush=True,
                    )
    report["machine_busy"] = round(machine.busy, 3)
    report["loadavg_before_after"] = [machine.loadavg_before, machine.loadavg_after]
    print(
        f"\nmodel {args.model}: {flops['params_total'] / 1e6:.2f}M params, {flops['params_active'] / 1e6:.2f}M "
        f"active, {flops['flops_per_token'] / 1e6:.1f} MFLOP/token (attention {flops['attention_share']:.0%}); "
        f"global batch {args.global_batch} x {cfg.data.seq_len} tokens, 2 processes x 1 thread"
    )
    print(
        f"{'layout':<6} {'dtype':<9} {'tokens/s':>9} {'step ms':>8} {'vs ' + layouts[0]:>7} {'GFLOP/s':>8} {'peak':>6} {'MFU':>6}"
    )
    for d in dtypes:
        base = None
        for name in layouts:
            runs = [x for x in report["runs"] if x["layout"] == name and x["dtype"] == d]
            tps = statistics.median(x["tokens_per_s"] for x in runs)
            # the same-round ratio to ep1 (a load burst hits both runs of a round)
            ratios = [
                x["tokens_per_s"] / y["tokens_per_s"]
                for x in runs
                for y in report["runs"]
                if y["layout"] == layouts[0] and y["dtype"] == d and y["round"] == x["round"]
            ]
            base = base or tps
            gflops = tps * flops["flops_per_token"] / 1e9
            peak = report["peak_gflops"][f"{PEAK_DTYPE[d]}/2x1"]
            row = {
                "layout": name,
                "dtype": d,
                "tokens_per_s": round(tps, 1),
                "step_ms": round(statistics.median(x["step_s"] for x in runs) * 1e3, 1),
                "base_layout": layouts[0],
                "ratio_to_base": round(statistics.median(ratios), 3) if ratios else None,
                "model_gflops": round(gflops, 2),
                "peak_gflops": peak,
                "mfu": round(gflops / peak, 4),
            }
            report["summary"].append(row)
            ratio = f"{row['ratio_to_base']:.2f}" if row["ratio_to_base"] is not None else "-"
            print(
                f"{name:<6} {d:<9} {row['tokens_per_s']:>9.0f} {row['step_ms']:>8.0f} {ratio:>7} "
                f"{gflops:>8.2f} {peak:>6.0f} {row['mfu']:>6.1%}"
            )
    for d in dtypes:
        tps = {r["layout"]: r["tokens_per_s"] for r in report["summary"] if r["dtype"] == d}
        if {"one", "one1"} <= tps.keys():
            ceiling = 2 * tps["one1"] / tps["one"]
            report.setdefault("ep2_ceiling", {})[d] = round(ceiling, 3)
            print(
                f"{d}: one process gains {tps['one'] / tps['one1']:.2f}x from its second thread, so EP=2 on 2 "
                f"processes x 1 thread can reach at most {ceiling:.2f}x one process (perfect split, free comms)"
            )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

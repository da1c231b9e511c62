"""What `train.deterministic=true` costs in speed, measured inside one job so machine load hits both modes alike.

    .venv/bin/python scripts/bench_deterministic.py --json bench_results/deterministic.json
    .venv/bin/python scripts/bench_deterministic.py --layout ep1 --rounds 20

Two gloo ranks (`automoe.parallel.spawn`) each build the real trainer from the recipe's composed config
(`configs/config.yaml` + `data=synthetic` + the layout: `ep2` = `parallel=ep2`, EP=2 with FSDP2; `ep1` =
`parallel=single`, FSDP2 data parallel) and, after --warmup steps, alternate blocks of --block optimizer steps
with the mode off and on (`torch.use_deterministic_algorithms`, the switch `train.deterministic` turns on; both
ranks switch together), --rounds times. Reported: each mode's median step time over its blocks and the median of
the per-round on/off ratios (a load burst tends to hit one round, i.e. both of its blocks).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from automoe.bench import MachineLoadMeter, machine_info, report_and_save
from automoe.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_trainer import MODELS, compose  # noqa: E402  (the model presets and config composition of that bench)

LAYOUTS = {"ep1": ["parallel=single"], "ep2": ["parallel=ep2"]}


def _worker(rank: int, world: int, overrides: list[str], warmup: int, block: int, rounds: int) -> dict:
    from automoe.parallel import DistEnv
    from automoe.train import build_trainer

    cfg = compose(overrides)
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    trainer = build_trainer(cfg, env)
    for _ in range(warmup):
        trainer.train_step()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            torch.distributed.barrier()
            start = time.perf_counter()
            for _ in range(block):
                trainer.train_step()
            times[deterministic].append((time.perf_counter() - start) / block)
    torch.use_deterministic_algorithms(False)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS), help="model preset of bench_trainer.py")
    p.add_argument("--layout", default="ep2", choices=sorted(LAYOUTS))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--warmup", type=int, default=3, help="steps before timing")
    p.add_argument("--block", type=int, default=3, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=12, help="rounds; each times one block off, then one on")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step (seq_len 128)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank and forward")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    steps = args.warmup + 2 * args.rounds * args.block
    overrides = [
        "data=synthetic",
        f"train.steps={steps}",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.dtype={args.dtype}",
        "train.val_interval=0",
        "checkpoint.interval=0",
        "logging.heatmap=false",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        f"output_dir={REPO / 'outputs' / 'bench_deterministic'}",
        *MODELS[args.model],
        *LAYOUTS[args.layout],
    ]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "overrides": overrides,
    }
    with MachineLoadMeter() as machine:
        results = run_distributed(_worker, 2, overrides, args.warmup, args.block, args.rounds, timeout_s=600)
    times = results[0]  # rank 0's clock (both ranks step in lockstep)
    ratios = [on / off for off, on in zip(times[False], times[True])]
    report["blocks_ms"] = {
        mode: [round(t * 1e3, 1) for t in times[det]] for mode, det in (("off", False), ("on", True))
    }
    report["summary"] = {
        "step_ms_off": round(statistics.median(times[False]) * 1e3, 1),
        "step_ms_on": round(statistics.median(times[True]) * 1e3, 1),
        "ratio_on_off_per_round": [round(x, 3) for x in ratios],
        "ratio_on_off_median": round(statistics.median(ratios), 3),
    }
    report["machine_busy"] = round(machine.busy, 3)
    report["loadavg_before_after"] = [machine.loadavg_before, machine.loadavg_after]
    s = report["summary"]
    print(
        f"blocks off (ms/step): {report['blocks_ms']['off']}\nblocks on  (ms/step): {report['blocks_ms']['on']}"
    )
    print(
        f"{args.model} {args.layout} {args.dtype}, 2 ranks: median step {s['step_ms_off']:.0f} ms off, "
        f"{s['step_ms_on']:.0f} ms on; on/off median over {args.rounds} rounds {s['ratio_on_off_median']:.3f}"
    )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

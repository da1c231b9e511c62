"""How long a checkpoint save blocks training, sync vs async (`checkpoint.async_save`), per model size and world.

    .venv/bin/python scripts/bench_checkpoint.py --json bench_results/checkpoint.json
    .venv/bin/python scripts/bench_checkpoint.py --models tiny --worlds 1 --repeats 2

For every (model, world) it starts `torchrun --standalone --nproc-per-node <world>` on this script in worker mode.
The worker builds the real job (`automoe.train.build_trainer`: world 1 `parallel=single`, world 2 `parallel=ep2`,
i.e. EP=2 with FSDP dense params), trains --warmup steps so AdamW has its state, then alternates --repeats times:

  sync   a plain step; `Checkpointer.save` (blocks until the DCP files and the marker are written); a step
  async  a plain step; `save` with async_save (returns once the state is staged and the write is queued on a
         separate gloo group); the next step (runs while the write proceeds); `wait()` (marks it complete)

blocked = save call + (step after the save - the plain step before it) + wait: the training time the save cost
(for async, `wait()` normally happens at the next save, long after the write ended; here it is one step later).
Medians over repeats, max over ranks. Checkpoints go to a temporary directory on the local disk.
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

from automoe.bench import MachineLoadMeter, machine_info, report_and_save
from automoe.torchrun import torchrun_command

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "tiny": [],  # configs/model/tiny.yaml: dim 128, 4 layers, 8 experts top-2 + 1 shared (~1.8M params)
    "d512l8": [
        "model.dim=512",
        "model.num_layers=8",
        "model.num_heads=8",
        "model.num_kv_heads=4",
        "model.ffn_inter_dim=2048",
        "model.moe.moe_inter_dim=512",
    ],
}
LAYOUT = {1: ["parallel=single"], 2: ["parallel=ep2"]}


# ---- worker (runs under torchrun) ----
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from automoe.config import register_configs
    from automoe.parallel import init_distributed, shutdown_distributed
    from automoe.train import build_trainer
    from automoe.train.build import config_to_yaml
    from automoe.train.checkpoint import Checkpointer

    register_configs()
    overrides = [
        "data=synthetic",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.steps=1000",
        "train.val_interval=0",
        "checkpoint.interval=0",
        "checkpoint.keep_last_n=1",
        "logging.heatmap=false",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        f"output_dir={args.out_dir}",
        *MODELS[args.model],
        *LAYOUT[int(os.environ.get("WORLD_SIZE", "1"))],
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    env = init_distributed(timeout_s=300)
    trainer = build_trainer(cfg, env)
    yaml = config_to_yaml(cfg)
    savers = {
        "sync": Checkpointer(Path(args.out_dir) / "sync", config_yaml=yaml, keep_last_n=1),
        "async": Checkpointer(Path(args.out_dir) / "async", config_yaml=yaml, keep_last_n=1, async_save=True),
    }

    def timed(fn) -> float:
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        trainer.train_step()
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in savers}
    for r in range(args.repeats + 1):  # the first round of each mode is untimed (first async save sets up)
        for mode, saver in savers.items():
            trainer.checkpointer = saver
            row = {"step_s": timed(trainer.train_step), "save_call_s": timed(trainer.save_checkpoint)}
            row["next_step_s"] = timed(trainer.train_step)
            row["wait_s"] = timed(saver.wait)
            row["blocked_s"] = row["save_call_s"] + row["next_step_s"] - row["step_s"] + row["wait_s"]
            if r > 0:
                for k, v in row.items():
                    samples[mode].setdefault(k, []).append(v)
    nbytes = sum(f.stat().st_size for f in (Path(args.out_dir) / "sync").rglob("*") if f.is_file())
    result = {mode: {k: statistics.median(v) for k, v in cols.items()} for mode, cols in samples.items()}
    flat = torch.tensor([v for mode in result.values() for v in mode.values()], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    it = iter(flat.tolist())
    result = {mode: {k: next(it) for k in cols} for mode, cols in result.items()}
    if env.is_main:
        Path(args.result).write_text(json.dumps({"results": result, "checkpoint_bytes": nbytes}))
    shutdown_distributed()


# ---- driver ----
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,d512l8", help=f"comma-separated presets: {', '.join(MODELS)}")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="process counts (1 and/or 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed saves per mode")
    p.add_argument("--warmup", type=int, default=2, help="training steps before the first save")
    p.add_argument("--timeout", type=int, default=900, help="seconds per (model, world)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    for w in args.worlds:
        if w not in LAYOUT:
            raise ValueError(f"--worlds {w} is not one of {list(LAYOUT)}")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "rows": [],
    }
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    scratch = REPO / "bench_results"  # git-ignored; absent in a fresh clone
    scratch.mkdir(parents=True, exist_ok=True)
    with MachineLoadMeter() as machine:
        for model in args.models.split(","):
            if model not in MODELS:
                raise ValueError(f"--models entry {model!r} is not one of {list(MODELS)}")
            for world in args.worlds:
                with tempfile.TemporaryDirectory(prefix="bench_ckpt_", dir=scratch) as tmp:
                    result = Path(tmp) / "result.json"
                    cmd = torchrun_command(
                        world,
                        __file__,
                        "--worker",
                        f"--model={model}",
                        f"--out-dir={tmp}",
                        f"--result={result}",
                        f"--repeats={args.repeats}",
                        f"--warmup={args.warmup}",
                    )
                    with MachineLoadMeter() as load:
                        proc = subprocess.run(
                            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout
                        )
                    if proc.returncode != 0:
                        raise RuntimeError(
                            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
                        )
                    out = json.loads(result.read_text())
                for mode, r in out["results"].items():
                    row = {
                        "model": model,
                        "world": world,
                        "mode": mode,
                        "checkpoint_MB": round(out["checkpoint_bytes"] / 2**20, 1),
                        **{k[: -len("_s")] + "_ms": round(v * 1e3, 1) for k, v in r.items()},
                        "machine_busy": round(load.busy, 3),
                    }
                    report["rows"].append(row)
                print(f"done {model} world {world} (machine busy {load.busy:.0%})", flush=True)
    report["machine_busy"] = round(machine.busy, 3)
    report["loadavg_before_after"] = [machine.loadavg_before, machine.loadavg_after]
    print(
        f"\n{'model':<7} {'world':>5} {'mode':<5} {'ckpt MB':>8} {'step ms':>8} {'save call':>9} "
        f"{'next step':>9} {'wait':>6} {'blocked ms':>10}"
    )
    for r in report["rows"]:
        print(
            f"{r['model']:<7} {r['world']:>5} {r['mode']:<5} {r['checkpoint_MB']:>8.1f} {r['step_ms']:>8.0f} "
            f"{r['save_call_ms']:>9.0f} {r['next_step_ms']:>9.0f} {r['wait_ms']:>6.0f} {r['blocked_ms']:>10.0f}"
        )
    report_and_save(report, machine, args.json)


if __name__ == "__main__":
    main()

"""Run the 2-process pretrain recipe (6 steps, checkpoints on) N times in a row and count non-zero exits.

    python scripts/stress_teardown.py [--runs 30] [--async-save] [--snapshot] [--json teardown.json]

Each run is `python -m torch.distributed.run --standalone --nproc-per-node 2 recipes/pretrain.py` with a small,
fast config (synthetic data, 6 steps, a checkpoint every 3 steps and after the last, wandb as in the default
config) into its own temporary output directory. A table of the runs (exit code, seconds, the first line that
names an abort) is printed and the whole record written as JSON, so a teardown race that shows up once in a
few hundred test runs can be counted before and after a fix. A non-zero exit after "finished step 6" (or with
an abort in the output) counts as a teardown failure; any other non-zero exit (e.g. a start-up error) is counted
apart. `--snapshot` runs a copy of the code taken at start, so edits to the checkout during the runs do not count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from automoe.bench import cpu_model
from automoe.torchrun import torchrun_command

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "data=synthetic",
    "data.synthetic_num_tokens=40000",
    "data.seq_len=64",
    "train.steps=6",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.val_interval=0",
    "optim.warmup_steps=2",
    "checkpoint.interval=3",  # saves at steps 3 and 6
    "logging.progress_bar=false",
    "logging.heatmap=false",
]
ABORT_SIGNS = ("terminate called", "Aborted", "SIGABRT", "Signal 6", "exitcode  : -6", "Traceback")


def snapshot(into: Path) -> Path:
    """Copy the code a run needs (package, recipes, configs) into `into`; -> the copy's root."""
    for name in ("automoe", "recipes", "configs"):
        shutil.copytree(REPO / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def run_once(root: Path, output_dir: Path, extra: list[str], timeout_s: float) -> dict:
    cmd = torchrun_command(
        2, root / "recipes" / "pretrain.py", *OVERRIDES, f"output_dir={output_dir}", *extra
    )
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, output = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
    seconds = time.perf_counter() - start
    sign = next((line.strip() for line in output.splitlines() if any(s in line for s in ABORT_SIGNS)), "")
    finished = "finished step 6" in output
    teardown = code != 0 and (finished or any(s in output for s in ABORT_SIGNS[:5]))
    return {
        "returncode": code,
        "seconds": round(seconds, 2),
        "finished": finished,
        "teardown_failure": teardown,
        "sign": sign,
        "output": output,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="number of runs (default 30)")
    parser.add_argument("--async-save", action="store_true", help="checkpoint.async_save=true")
    parser.add_argument("--timeout", type=float, default=180, help="seconds before one run counts as hung")
    parser.add_argument(
        "--json", type=Path, default=Path("stress_teardown.json"), help="where the record goes"
    )
    parser.add_argument("--snapshot", action="store_true", help="run a copy of the code taken at start")
    parser.add_argument("--label", default="", help="free text stored in the JSON (e.g. before/after)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the recipe")
    args = parser.parse_args()
    extra = [*(["checkpoint.async_save=true"] if args.async_save else []), *args.overrides]

    runs = []
    print(f"{'run':>4} {'exit':>7} {'seconds':>8} {'step6':>6}  note", flush=True)
    with tempfile.TemporaryDirectory(prefix="stress_teardown_") as tmp:
        root = snapshot(Path(tmp) / "code") if args.snapshot else REPO
        for i in range(args.runs):
            record = run_once(root, Path(tmp) / f"run{i}", extra, args.timeout)
            runs.append(record)
            note = record["sign"][:70]
            print(
                f"{i:>4} {record['returncode']!s:>7} {record['seconds']:>8.2f} {record['finished']!s:>6}  {note}",
                flush=True,
            )
    failed = [r for r in runs if r["returncode"] != 0]
    teardown = [r for r in runs if r["teardown_failure"]]
    summary = {
        "label": args.label,
        "runs": len(runs),
        "failed": len(failed),
        "teardown_failures": len(teardown),
        "snapshot": args.snapshot,
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "overrides": OVERRIDES + extra,
        "results": [{k: v for k, v in r.items() if k != "output"} for r in runs],
        "failed_output_tails": [r["output"][-6000:] for r in failed],
    }
    args.json.write_text(json.dumps(summary, indent=2))
    print(
        f"{len(failed)} of {len(runs)} runs exited non-zero, {len(teardown)} of them after training "
        f"(teardown failures) ({summary['cpu']}); record in {args.json}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Run `recipes/pretrain.py` under torchrun from tests: small, fast settings and a finite timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from automoe.torchrun import torchrun_command

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "recipes" / "pretrain.py"

# A few-second job: the tiny model (8 experts) on a small synthetic corpus, nothing slow switched on.
FAST = [
    "data=synthetic",
    "data.synthetic_num_tokens=40000",
    "data.seq_len=64",
    "train.steps=6",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.val_interval=0",
    "optim.warmup_steps=2",
    "checkpoint.interval=0",
    "logging.progress_bar=false",
    "logging.heatmap=false",
    "logging.loss_curve=false",  # matplotlib on rank 0: ~0.6 CPU-s a run that no test using FAST looks at
    "logging.wandb.mode=disabled",
]


@dataclass
class RecipeRun:
    returncode: int
    output: str
    seconds: float


def run_recipe(nproc: int, output_dir: Path, *overrides: str, timeout: float = 120) -> RecipeRun:
    """`torchrun --standalone --nproc-per-node nproc recipes/pretrain.py FAST... output_dir=... overrides...`."""
    cmd = torchrun_command(nproc, PRETRAIN, *FAST, f"output_dir={output_dir}", *overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return RecipeRun(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start)


def check_ok(run: RecipeRun) -> RecipeRun:
    assert run.returncode == 0, run.output[-4000:]
    return run


def run_plain_python(output_dir: Path, *overrides: str, timeout: float = 120) -> RecipeRun:
    """`python recipes/pretrain.py FAST... output_dir=... overrides...`: one process, no torchrun."""
    cmd = [sys.executable, str(PRETRAIN), *FAST, f"output_dir={output_dir}", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return RecipeRun(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start)

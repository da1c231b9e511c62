"""Launch `recipes/pretrain.py` under torchrun for the reliability tests: restarts, fault spec, wall time."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from automoe.torchrun import torchrun_command
from tests.integration.recipe import FAST, PRETRAIN, REPO, RecipeRun


def torchrun(
    nproc: int,
    output_dir: Path,
    *overrides: str,
    fault: str | None = None,
    max_restarts: int = 0,
    timeout: float = 120,
) -> RecipeRun:
    """`torchrun --standalone --max-restarts R --nproc-per-node N recipes/pretrain.py FAST... overrides...`.

    `fault` goes to the workers as `AUTOMOE_FAULT` (see `automoe.train.faults`).
    """
    cmd = torchrun_command(
        nproc, PRETRAIN, *FAST, f"output_dir={output_dir}", *overrides, max_restarts=max_restarts
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("AUTOMOE_FAULT", None)
    if fault:
        env["AUTOMOE_FAULT"] = fault
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return RecipeRun(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start)


def tail(run: RecipeRun, n: int = 4000) -> str:
    """The end of a run's output without DCP's debug chatter, for assertion messages."""
    return "\n".join(line for line in run.output.splitlines() if "dcp_logger" not in line)[-n:]

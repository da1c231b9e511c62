"""The one way tests and benchmarks start a script under torchrun on this machine.

`python -m torch.distributed.run` with this interpreter, so the launcher and its workers are the running
environment's, wherever it lives (no `.venv/bin/torchrun` path to get wrong).
"""

from __future__ import annotations

import sys
from pathlib import Path


def torchrun_command(
    nproc: int,
    script: str | Path,
    *args: str,
    standalone: bool = True,
    max_restarts: int | None = None,
) -> list[str]:
    """`python -m torch.distributed.run [--standalone] --nproc-per-node N [--max-restarts R] script args...`.

    standalone: a local rendezvous on a free port (one machine, no MASTER_ADDR needed).
    max_restarts: torchrun restarts every worker this many times after a failure (None: torchrun's default, 0).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if standalone:
        cmd.append("--standalone")
    cmd.append(f"--nproc-per-node={nproc}")
    if max_restarts is not None:
        cmd.append(f"--max-restarts={max_restarts}")
    return [*cmd, str(script), *args]

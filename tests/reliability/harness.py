"""Run small world-1 training jobs in forked workers (crashable with SIGKILL) and compare their metrics.

Workers come from the forkserver of `tests.distributed.spawn` (torch and automoe imported once), so each job starts in
milliseconds, and a worker killed by a fault dies like a real process: no handlers, no flushing, its files as it
left them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from tests.distributed.spawn import forkserver_context

LOOP_KEYS = ("loss", "aux_loss", "grad_norm", "lr", "skipped")


def _job(output_dir: str, overrides: tuple[str, ...], fault: str | None) -> None:
    import torch

    from automoe.parallel import DistEnv
    from automoe.train import build_trainer
    from automoe.train.faults import from_spec
    from tests.unit.train.conftest import make_job

    torch.set_num_threads(1)
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    build_trainer(make_job(output_dir, *overrides), env, faults=from_spec(fault, rank=0)).fit()


def run_job(output_dir: Path, *overrides: str, fault: str | None = None, timeout: float = 60) -> int:
    """Train the `tests.unit.train.conftest.SMALL_JOB` (+ overrides) in a fresh worker; -> its exit code.

    0: finished; -9: killed by its fault; 1: raised (the traceback goes to stderr).
    """
    proc = forkserver_context().Process(target=_job, args=(str(output_dir), tuple(overrides), fault))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"job in {output_dir} still running after {timeout}s")
    return proc.exitcode


def loop_values(records: list[dict]) -> list[tuple]:
    """Per step: (step, loss, aux_loss, grad_norm, lr, skipped), for bit-for-bit comparison."""
    return [(r["step"], *(r[k] for k in LOOP_KEYS)) for r in records]

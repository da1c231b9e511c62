"""The one helper that runs a test function on real gloo process groups (CPU, FileStore, finite timeouts).

The ranks are forked from a forkserver that imported torch, its distributed packages and automoe once per pytest
process, so a rank starts in milliseconds instead of the ~6 CPU-seconds of a fresh interpreter's imports (the
suite's largest cost). Each rank still is its own process with its own gloo group: a forkserver never joins a
process group, it only forks. The rank body is `automoe.parallel.spawn`'s (also used by the benchmarks that
measure collectives, which keep the `spawn` start method).

A forked rank ends with `os._exit` after the body's `shutdown_distributed` (no interpreter finalization): the
exit-time teardown of real jobs is covered by the torchrun tests and `test_teardown.py`'s direct thread count.
A rank starts in its parent's working directory but with the forkserver's environment (the one at its first use):
pass settings as arguments, not as environment variables set by a test.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from automoe.parallel.spawn import PG_TIMEOUT_S
from automoe.parallel.spawn import _worker as _rank_main

__all__ = ["PG_TIMEOUT_S", "forkserver_context", "run_distributed"]

# What every forked worker would otherwise import itself. torch._dynamo comes in lazily with the first meta-device
# init (seconds); the tests' own modules are imported by the children when they unpickle the function.
PRELOAD = [
    "torch._dynamo",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "torch.distributed.pipelining",
    "automoe.parallel",
    "automoe.train",
    "automoe.models.transformer",
    "tests.tolerance",
    "tests.unit.train.conftest",
    "tests.reliability.harness",
]
_CONTEXT = None


def forkserver_context():
    """The process-wide forkserver context with `PRELOAD` (also the reliability harness's world-1 jobs)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def run_distributed(fn, world_size: int, *args, timeout_s: float = PG_TIMEOUT_S) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return each rank's return value.

    `fn` must be a module-level function. Each process has one thread and a gloo default group whose collectives
    time out after `timeout_s`. A failure on any rank raises here (the others are terminated).
    """
    forkserver_context()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(
            _rank_main,
            args=(world_size, store, tmp, timeout_s, fn, args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

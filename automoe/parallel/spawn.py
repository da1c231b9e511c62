"""Run a function on N local processes over real gloo process groups (CPU, FileStore, finite timeouts).

The one multi-process harness of the distributed tests (`tests/distributed/spawn.py`) and the benchmarks that
measure collectives; training jobs start under torchrun instead (`automoe.torchrun`).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from automoe.parallel.env import shutdown_distributed

PG_TIMEOUT_S = 60


def _worker(
    rank: int, world_size: int, store_path: str, out_dir: str, timeout_s: float, fn, args: tuple
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    clean = False
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        result = None
        clean = True
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        # Barrier on success, destroy every group, then free the ones only cycles still hold, so their gloo
        # threads are joined before the interpreter finalizes (automoe.train.launch._exit_before_finalization).
        shutdown_distributed(clean=clean)


def run_distributed(fn, world_size: int, *args, timeout_s: float = PG_TIMEOUT_S) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return each rank's return value.

    `fn` must be a module-level function. Each process has one thread and a gloo default group whose collectives
    time out after `timeout_s`. A failure on any rank raises here (the others are terminated).
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_worker, args=(world_size, store, tmp, timeout_s, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

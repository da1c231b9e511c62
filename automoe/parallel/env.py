"""Process-group start-up: device and backend from what is available, finite timeouts, restart-safe rendezvous."""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int = 0) -> torch.device:
    """cuda:<local_rank> when a GPU is present, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_backend(device: torch.device) -> str:
    """nccl for GPU tensors (with gloo for CPU-side collectives), gloo on CPU-only machines."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def init_distributed(*, timeout_s: float = 300.0) -> DistEnv:
    """Initialize the default process group from torchrun's environment (or run as one process).

    Every collective gets a finite `timeout_s`, so a dead peer ends the job instead of hanging it. Under
    `torchrun --max-restarts`, each restart attempt uses its own key space in the rendezvous store: torchrun keeps
    one store across attempts and gloo would otherwise read the dead attempt's addresses.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size,
            is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
            timeout=timeout,
            wait_for_workers=False,
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"automoe/attempt_{attempt}", store)
        dist.init_process_group(
            pick_backend(device), store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        # Groups created later without an explicit timeout (DeviceMesh sub-groups, the async-checkpoint group)
        # take c10d's module default (30 min for gloo), not the one above: make that default ours too.
        dist.distributed_c10d.default_pg_timeout = timeout
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
        logger.info(
            "initialized %s process group: rank %d of %d (attempt %s)",
            pick_backend(device),
            rank,
            world_size,
            attempt,
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def live_gloo_threads() -> int:
    """Native gloo threads alive in this process (`pt_gloo_runloop` workers, `gloo_tcp_loop` I/O); 0 off Linux."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    count = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().startswith(("pt_gloo", "gloo_"))
        except OSError:  # the thread ended while we looked
            pass
    return count


def shutdown_distributed(*, clean: bool = False) -> int:
    """Destroy every process group; -> the number of gloo threads still alive afterwards.

    `clean=True` (the job succeeded on this rank) first waits at a barrier so no rank tears gloo down while a peer
    is still finishing its last collective; after a failure there is no barrier, since a dead peer would hold it
    until the collective timeout.

    `destroy_process_group` only unregisters the groups: each gloo group's threads (two `pt_gloo_runloop`
    workers and a `gloo_tcp_loop`) are joined by its C++ destructor, which runs when the last Python reference
    goes. Groups reachable only through reference cycles (FSDP state <-> module) are freed by the `gc.collect()`
    here, while the interpreter is fully alive; whatever is still referenced (the count returned) would otherwise
    be torn down during interpreter finalization (see `automoe.train.launch.run_job`).
    """
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()
    return live_gloo_threads()

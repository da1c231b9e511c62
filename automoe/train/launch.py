"""The job lifecycle every recipe shares: distributed start-up, logging, the resolved config, fit, teardown."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from automoe.config.job import JobConfig
from automoe.parallel import DistEnv, init_distributed, shutdown_distributed
from automoe.train.build import build_trainer, config_to_yaml
from automoe.train.trainer import Trainer

logger = logging.getLogger("automoe")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; the other ranks only warnings and errors (tagged with their rank)."""
    for name, log in logging.root.manager.loggerDict.items():  # hydra's "disabled" logging switched ours off
        if name.startswith("automoe") and isinstance(log, logging.Logger):
            log.disabled = False
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def run_job(cfg: JobConfig, *, after_fit: Callable[[Trainer, DistEnv], None] | None = None) -> dict[str, Any]:
    """Init distributed -> log and save the resolved config -> build -> `Trainer.fit` -> `after_fit` -> teardown.

    Returns the last step's metrics record. On success every rank meets at a barrier before the process groups
    are destroyed; after a failure they are destroyed at once (a dead peer would hold a barrier until timeout).
    A successful multi-process job whose gloo threads outlive the teardown ends its process here, with exit
    status 0, instead of returning (see `_exit_before_finalization`).
    """
    env = init_distributed(timeout_s=cfg.parallel.collective_timeout_s)
    setup_logging(env.rank)
    clean = False
    trainer = None
    try:
        if env.is_main:
            resolved = config_to_yaml(cfg)
            logger.info("world size %d, resolved config:\n%s", env.world_size, resolved)
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "config.yaml").write_text(resolved)
        trainer = build_trainer(cfg, env)
        last = trainer.fit()
        if last:
            val = f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""
            logger.info(
                "finished step %d: loss %.4f%s; outputs in %s",
                last["step"],
                last["loss"],
                val,
                cfg.output_dir,
            )
        if after_fit is not None:
            after_fit(trainer, env)
        clean = True
    finally:
        trainer = None  # model, meshes and checkpointer hold the process groups
        threads_left = shutdown_distributed(clean=clean)
    if clean and threads_left:
        _exit_before_finalization(threads_left)
    return last


def _exit_before_finalization(threads_left: int) -> None:
    """End a finished job's process now: flush, then `os._exit(0)`, skipping interpreter finalization.

    Cause of the rare `terminate called without an active exception` (SIGABRT, exit -6) after the last step.
    Measured: the process groups outlive `destroy_process_group` (DeviceMesh, FSDP and DTensor state keep Python
    references to them; dropping the trainer and `gc.collect()` do not free them), so at exit each rank of the
    EP=2 recipe still runs 6 gloo groups = 18 native threads (12 `pt_gloo_runloop` workers, 6 `gloo_tcp_loop`
    socket loops). Their C++ destructors, the only place those threads are joined, then run during interpreter
    finalization and static destruction, in no fixed order, while the peer rank exits and closes its sockets.
    Inferred (the abort was not caught in a core dump): a gloo thread that takes the GIL then (to drop a tensor's
    Python object) is ended by CPython with `pthread_exit`, whose forced unwind through a noexcept C++ frame
    calls `std::terminate`. Every output is written and closed by now (checkpoints waited, metrics and wandb
    closed, process groups destroyed), so skipping finalization loses nothing and leaves no thread to race it.
    """
    logger.debug(
        "%d gloo threads outlive the process groups; exiting before interpreter finalization", threads_left
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

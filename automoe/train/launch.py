"""The job lifecycle every recipe shares: distributed start-up, logging, the resolved config, fit, teardown."""

from __future__ import annotations

import logging
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
    """
    env = init_distributed(timeout_s=cfg.parallel.collective_timeout_s)
    setup_logging(env.rank)
    clean = False
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
        shutdown_distributed(clean=clean)
    return last

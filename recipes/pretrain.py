"""Pretrain a Mixture-of-Experts language model.

    torchrun --nproc-per-node 2 recipes/pretrain.py [--config-name NAME] [key=value ...]

The default config (`configs/config.yaml`) is the main job: a tiny MoE on the Python standard library's
sources with expert parallelism over 2 CPU processes. Examples:

    torchrun --nproc-per-node 1 recipes/pretrain.py parallel=single train.steps=50 output_dir=outputs/one
    torchrun --nproc-per-node 2 recipes/pretrain.py checkpoint.resume=latest   # continue the run above

Composition -> typed `JobConfig` (bad keys and values fail here, before any process group) -> distributed
init -> `build_trainer` (layout, data, model, optimizer, resume) -> `Trainer.fit` -> teardown.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from automoe.config import JobConfig, register_configs
from automoe.parallel import init_distributed, shutdown_distributed
from automoe.train import build_trainer, config_to_yaml

logger = logging.getLogger("automoe")

register_configs()


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


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    cfg: JobConfig = OmegaConf.to_object(dict_cfg)  # runs every __post_init__ check
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
        clean = True
    finally:
        shutdown_distributed(clean=clean)


if __name__ == "__main__":
    main()

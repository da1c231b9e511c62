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

import hydra
from omegaconf import DictConfig, OmegaConf

from automoe.config import JobConfig, register_configs
from automoe.train.launch import run_job

register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    cfg: JobConfig = OmegaConf.to_object(dict_cfg)  # runs every __post_init__ check, before any process group
    run_job(cfg)


if __name__ == "__main__":
    main()

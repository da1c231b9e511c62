"""Pretrain a Mixture-of-Experts language model.

    torchrun --nproc-per-node 2 recipes/pretrain.py [--config-name NAME] [key=value ...]

The default config (`configs/config.yaml`) is the main job: a tiny MoE on the Python standard library's
sources with expert parallelism over 2 CPU processes. Examples:

    torchrun --nproc-per-node 1 recipes/pretrain.py parallel=single train.steps=50 output_dir=outputs/one
    torchrun --nproc-per-node 1 recipes/pretrain.py parallel=single train.steps=80 output_dir=outputs/one \
        checkpoint.resume=latest   # continue the run above to step 80 (the lr schedule now spans 80 steps)

Composition -> typed `JobConfig` (bad keys and values fail here, before any process group) -> distributed
init -> `check_start` (every rank's config and verdict compared; a refusal is printed once) -> `build_trainer`
(layout, data, model, optimizer, resume) -> `Trainer.fit` -> teardown. Launch it with torchrun; a plain
`python recipes/pretrain.py` is one process, which only `parallel=single` fits.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from automoe.config import register_configs
from automoe.config.job import to_job_config
from automoe.train.launch import hold_peer_stderr, recipe_main

register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    # to_job_config: unknown keys (also +key / ++key) and every __post_init__ check, before any process group
    recipe_main(lambda: to_job_config(dict_cfg))


if __name__ == "__main__":
    with hold_peer_stderr():
        main()

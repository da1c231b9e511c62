"""Pretrain a Mixture-of-Experts language model.

    torchrun --nproc-per-node 2 recipes/pretrain.py [--config-name NAME] [key=value ...]

The default config (`configs/config.yaml`) is the main job: a tiny MoE on the Python standard library's
sources with expert parallelism over 2 CPU processes. Examples:

    torchrun --nproc-per-node 1 recipes/pretrain.py parallel=single train.steps=50 output_dir=outputs/one
    torchrun --nproc-per-node 1 recipes/pretrain.py parallel=single train.steps=80 output_dir=outputs/one \
        checkpoint.resume=latest   # continue the run above to step 80 (the lr schedule now spans 80 steps)

`hf.export_to=DIR` writes the final model as a Hugging Face directory of `hf.family` (default: the first family
that can express the model; a model none can express is refused before training, naming each family's reason).
The default tiny model has an ungated shared expert, which no HF family has; with a gated one it is a Qwen2-MoE:

    torchrun --nproc-per-node 2 recipes/pretrain.py model.moe.shared_expert_gate=true hf.export_to=outputs/run/hf

Composition -> typed `JobConfig` (bad keys and values fail here, before any process group) -> distributed
init -> `check_start` (every rank's config and verdict compared; a refusal is printed once) -> `build_trainer`
(layout, data, model, optimizer, resume) -> `Trainer.fit` -> teardown. Launch it with torchrun; a plain
`python recipes/pretrain.py` is one process, which only `parallel=single` fits.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from automoe.config import register_configs
from automoe.config.job import JobConfig, to_job_config
from automoe.hf.finetune import export_after_fit, export_family
from automoe.hf.hub import resolve_local
from automoe.train.launch import hold_peer_stderr, recipe_main

register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    recipe_main(
        lambda: job_config(dict_cfg),
        after_fit=lambda cfg: export_after_fit(cfg) if cfg.hf.export_to is not None else None,
    )


def job_config(dict_cfg: DictConfig) -> JobConfig:
    """to_job_config (unknown keys, also +key / ++key, and every __post_init__ check), an hf.init_from hub id
    resolved offline, and with hf.export_to the export family's check: all before any process group."""
    cfg = to_job_config(dict_cfg)
    if cfg.hf.init_from is not None:  # a hub id: its snapshot in the local HF cache (never downloaded)
        cfg.hf.init_from = str(resolve_local(cfg.hf.init_from, key="hf.init_from"))
    if cfg.hf.export_to is not None:
        export_family(cfg.hf.init_from, cfg.hf.family, cfg.model)
    return cfg


if __name__ == "__main__":
    with hold_peer_stderr():
        main()

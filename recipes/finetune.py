"""Fine-tune a Hugging Face MoE checkpoint (any family of `automoe.hf.FAMILIES`) with the pretraining stack.

    torchrun --nproc-per-node 2 recipes/finetune.py hf.init_from=HF_DIR [key=value ...]

The model section comes from `HF_DIR/config.json` (`automoe.hf.config_from_hf`), with any `model.*` override
of the command line on top (e.g. `model.max_seq_len=4096 model.moe.aux_loss_coeff=0.01`; overrides that change
a tensor shape fail before training). The weights are loaded into the already parallelized model, each rank
reading only its own experts. Everything else is the pretraining recipe (`configs/finetune.yaml` defaults):

    torchrun --nproc-per-node 2 recipes/finetune.py hf.init_from=ckpt/qwen3 data.source=tokens \\
        data.path=data/ids.bin train.steps=200 hf.export_to=outputs/finetune/hf
    torchrun --nproc-per-node 2 recipes/finetune.py hf.init_from=ckpt/qwen3 checkpoint.resume=latest

`checkpoint.resume` continues an interrupted fine-tune from its own `step_<N>` checkpoint (the HF weights are
then not read). `hf.export_to` writes the final model as an HF directory that `transformers` loads. `hf.init_from`
may be a hub id already in the local HF cache (nothing is downloaded). The data must be in the checkpoint's
tokenizer: text sources are tokenized with it (when the directory holds one), token files are checked against it.
`--cfg job` prints the config that will run, with the `model` section read from `hf.init_from` (`recipes/finetune.py
hf.init_from=ckpt/qwen3 --cfg job`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from automoe.config import JobConfig, register_configs
from automoe.config.job import to_job_config
from automoe.hf.finetune import export_after_fit, export_family, hf_model_config
from automoe.hf.hub import resolve_local
from automoe.train.launch import hold_peer_stderr, recipe_main

logger = logging.getLogger("automoe")

register_configs()


def model_overrides() -> dict[str, Any]:
    """The `model.*` overrides of this command line as a nested dict (Hydra already checked them)."""
    dotlist = []
    for item in HydraConfig.get().overrides.task:
        key = item.lstrip("+")
        if key.startswith("model."):
            dotlist.append(key[len("model.") :])
    return OmegaConf.to_container(OmegaConf.from_dotlist(dotlist))


def job_config(dict_cfg: DictConfig) -> JobConfig:
    """The composed config with its `model` section replaced by `hf.init_from/config.json` (+ overrides)."""
    if OmegaConf.is_missing(dict_cfg.hf, "init_from") or dict_cfg.hf.init_from is None:
        raise ValueError(
            "hf.init_from is required: the Hugging Face model directory (config.json + safetensors), or a hub id "
            "already in the local HF cache, to fine-tune, e.g. `recipes/finetune.py hf.init_from=ckpt/qwen3`"
        )
    dict_cfg.hf.init_from = str(resolve_local(dict_cfg.hf.init_from, key="hf.init_from"))
    model_cfg, _ = hf_model_config(dict_cfg.hf.init_from, overrides=model_overrides())
    dict_cfg.model = OmegaConf.structured(model_cfg)
    cfg: JobConfig = to_job_config(dict_cfg)  # unknown keys (also +key / ++key), every __post_init__ check
    if cfg.hf.export_to is not None:
        # a bad hf.family, or a model that family cannot express, fails now, not after training
        export_family(cfg.hf.init_from, cfg.hf.family, cfg.model)
    return cfg


def take_print_job_flag(argv: list[str]) -> bool:
    """Remove `--cfg job` / `-c job` from `argv`; -> whether it was there. Hydra would print the config before the
    model section exists; this recipe prints it after reading `hf.init_from` instead."""
    for i, word in enumerate(argv[:-1]):
        if word in ("--cfg", "-c") and argv[i + 1] == "job":
            del argv[i : i + 2]
            return True
    return False


PRINT_JOB = False  # set from the command line in __main__


@hydra.main(version_base=None, config_path="../configs", config_name="finetune")
def main(dict_cfg: DictConfig) -> None:
    if PRINT_JOB:
        from automoe.train.build import config_to_yaml

        try:
            print(config_to_yaml(job_config(dict_cfg)), end="")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        return
    recipe_main(
        lambda: job_config(dict_cfg),
        after_fit=lambda cfg: export_after_fit(cfg) if cfg.hf.export_to is not None else None,
    )


if __name__ == "__main__":
    PRINT_JOB = take_print_job_flag(sys.argv)
    with hold_peer_stderr():
        main()

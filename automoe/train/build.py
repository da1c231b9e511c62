"""Assemble a training job from a `JobConfig`: layout, data, model, optimizer, checkpoint resume -> `Trainer`.

Order matters and is spelled out in numbered steps: everything a user can get wrong is checked before the first
collective, the model is built on the meta device and materialized once, and a resumed run loads its checkpoint
into objects already built for this run's layout (DCP reshards).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from automoe import parallel
from automoe.config.checks import check_sequence_split
from automoe.config.job import JobConfig
from automoe.data import StatefulLoader, build_datasets
from automoe.models import Transformer, num_params
from automoe.train.checkpoint import Checkpointer, resolve_resume
from automoe.train.faults import FaultHooks, from_env
from automoe.train.metrics import MetricsLogger
from automoe.train.optim import build_optimizer, build_scheduler
from automoe.train.trainer import Trainer

logger = logging.getLogger(__name__)


def config_to_yaml(cfg: JobConfig) -> str:
    """The resolved config (derived values filled in) as YAML: printed at start, saved with every checkpoint."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check_hf_init(cfg: JobConfig) -> str | None:
    """`hf.init_from` validated against `cfg.model` (config.json and headers only); None when unset."""
    if cfg.hf.init_from is None:
        return None
    from automoe.hf.finetune import check_hf_init

    _, notes = check_hf_init(cfg.model, cfg.hf.init_from)
    for note in notes:
        logger.warning(
            "hf.init_from: %s: kept (every tensor shape is unchanged; the function may differ)", note
        )
    return cfg.hf.init_from


def _load_hf_init(model: torch.nn.Module, hf_dir: str) -> None:
    from automoe.hf import load_hf_into_model

    read = load_hf_into_model(model, hf_dir)
    logger.info("initialized from HF checkpoint %s (%d tensors read on rank 0)", hf_dir, len(read))


def build_trainer(cfg: JobConfig, env: parallel.DistEnv, *, faults: FaultHooks | None = None) -> Trainer:
    """Everything `Trainer.fit` needs, on every rank. Raises ValueError for bad settings before training starts.

    `faults`: fault-injection hooks for the reliability tests; default: from `AUTOMOE_FAULT` (unset: none).
    """
    if faults is None:
        faults = from_env(rank=env.rank)
    pcfg, train = cfg.parallel, cfg.train
    output_dir = Path(cfg.output_dir)
    ckpt_root = output_dir / "checkpoints"
    # 1. validate the layout and the resume target (no collective has run yet)
    dims = parallel.ParallelDims(
        world_size=env.world_size,
        dp_replicate=pcfg.dp_replicate,
        dp_shard=pcfg.dp_shard,
        cp=pcfg.cp,
        ep=pcfg.ep,
        num_experts=cfg.model.moe.num_experts if cfg.model.num_moe_layers else None,
    )
    check_sequence_split(cfg.data.seq_len, pcfg.cp)
    resume_path = resolve_resume(cfg.checkpoint.resume, ckpt_root)
    hf_init = _check_hf_init(cfg) if resume_path is None else None
    # 2. data: the same datasets on every rank; the loader takes this rank's slice of each global batch
    train_ds, val_ds = build_datasets(cfg.data)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({train_ds.vocab_size} ids, data.source={cfg.data.source!r})"
        )
    if dims.world_size > 1:
        dims.build_meshes()
    dp_rank, dp_size = dims.dp_coordinate()
    loader = StatefulLoader(
        train_ds,
        global_batch_size=train.global_batch_size,
        micro_batch_size=train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.data.seed,
        shuffle=cfg.data.shuffle,
    )
    # 3. model: build on meta, parallelize, materialize, one layout-invariant init from the seed
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallel.parallelize(model, dims, pcfg)
    model.to_empty(device=env.device)
    torch.manual_seed(train.seed)
    model.init_weights()  # also fills the non-persistent buffers (RoPE tables, load counters)
    if hf_init is not None:  # HF weights overwrite every parameter; each rank reads only its shard's experts
        _load_hf_init(model, hf_init)
    model.train()
    counts = num_params(model)
    logger.info("model: %.2fM parameters, %.2fM active per token", counts.total / 1e6, counts.active / 1e6)
    # 4. optimizer, schedule, checkpointer; then restore a checkpoint into them
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=train.steps)
    checkpointer = Checkpointer(
        ckpt_root,
        config_yaml=config_to_yaml(cfg),
        keep_last_n=cfg.checkpoint.keep_last_n,
        async_save=cfg.checkpoint.async_save,
        faults=faults,
    )
    start_step = 0
    if resume_path is not None:
        start_step = checkpointer.load(
            resume_path, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader
        )
    elif cfg.checkpoint.resume == "latest":  # nothing to resume: a fresh run (from hf.init_from if set)
        logger.info(
            "checkpoint.resume=latest: no complete checkpoint under %s, starting from scratch", ckpt_root
        )
    # 5. metrics (rank 0 writes)
    metrics = MetricsLogger(
        output_dir,
        cfg=cfg.logging,
        is_main=env.is_main,
        total_steps=train.stop_at_step or train.steps,
        start_step=start_step,
        run_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )
    return Trainer(
        cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        val_dataset=val_ds,
        dims=dims,
        device=env.device,
        checkpointer=checkpointer,
        metrics=metrics,
        start_step=start_step,
        faults=faults,
    )

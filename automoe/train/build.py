"""Assemble a training job from a `JobConfig`: layout, data, model, optimizer, checkpoint resume -> `Trainer`.

Order matters and is spelled out in numbered steps: everything a user can get wrong is checked before the first
collective (`plan_start`), the model is built on the meta device and materialized once, and a resumed run loads
its checkpoint into objects already built for this run's layout (DCP reshards).

Where the state of a run comes from:

| start | weights | optimizer moments | step, lr schedule position, data position, RNG |
|---|---|---|---|
| fresh | seeded init (`train.seed`) | zero | 0, seeded |
| `hf.init_from` | the HF checkpoint | zero | 0, seeded |
| `checkpoint.init_from` | the checkpoint | zero, or the checkpoint's (`checkpoint.init_optimizer`) | 0, seeded |
| `checkpoint.resume` | the checkpoint | the checkpoint's | the checkpoint's |

In every case the settings are this run's config: lr, betas, eps, weight decay and the schedule's shape and
length (`optim.*`, `train.steps`) are applied after loading (`apply_optim_config`), whatever the checkpoint's
config said; a resume logs each setting that differs from the checkpoint's config.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from automoe import parallel
from automoe.config.checks import check_sequence_split
from automoe.config.job import JobConfig
from automoe.data import StatefulLoader, build_datasets
from automoe.data.tokenizer_check import check_data_tokenizer, data_tokenizer
from automoe.models import Transformer, num_params
from automoe.parallel.pipeline import check_pipeline
from automoe.parallel.tensor_parallel import check_tensor_parallel
from automoe.train.checkpoint import (
    Checkpointer,
    check_model_shapes,
    check_step_dir,
    config_changes,
    resolve_resume,
    saved_step,
)
from automoe.train.determinism import seed_all, set_deterministic
from automoe.train.faults import FaultHooks, from_env
from automoe.train.metrics import MetricsLogger
from automoe.train.optim import apply_optim_config, build_optimizer, build_scheduler
from automoe.train.trainer import Trainer

logger = logging.getLogger(__name__)


def config_to_yaml(cfg: JobConfig) -> str:
    """The resolved config (derived values filled in) as YAML: printed at start, saved with every checkpoint."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check_hf_init(cfg: JobConfig) -> tuple[str | None, list[str]]:
    """`hf.init_from` validated against `cfg.model` (config.json and headers only) -> (the dir or None when unset,
    warnings about fields that differ but change no tensor shape)."""
    if cfg.hf.init_from is None:
        return None, []
    from automoe.hf.finetune import check_hf_init

    _, notes = check_hf_init(cfg.model, cfg.hf.init_from)
    return cfg.hf.init_from, [
        f"hf.init_from: {note}: kept (every tensor shape is unchanged; the function may differ)"
        for note in notes
    ]


def _load_hf_init(model: torch.nn.Module, hf_dir: str) -> tuple[str, ...]:
    """Load `hf_dir` into `model`; -> the parameters/buffers the load did not write (logged; normally none)."""
    from automoe.hf import load_hf_weights

    report = load_hf_weights(model, hf_dir)
    logger.info(
        "initialized from HF checkpoint %s (%d tensors read on rank 0)", hf_dir, len(report.read_keys)
    )
    if report.not_written:
        logger.warning(
            "hf.init_from=%s did not write %d model tensors (they keep their random init): %s",
            hf_dir,
            len(report.not_written),
            ", ".join(report.not_written),
        )
    return tuple(report.not_written)


@dataclass
class StartPlan:
    """What a start will do, decided from the config, the world size and the files alone (no collective)."""

    dims: parallel.ParallelDims
    resume_path: Path | None = None  # checkpoint.resume resolved: the step_<N> dir to continue
    init_path: Path | None = None  # checkpoint.init_from (only when not resuming): weights of a new run
    hf_init: str | None = None  # hf.init_from (only when not resuming)
    start_step: int = 0  # the step training continues after
    done: str | None = None  # why there is nothing to train (the run, or this invocation, is complete)
    warnings: list[str] = field(default_factory=list)  # logged once by rank 0
    changes: list[str] = field(default_factory=list)  # settings that differ from the resumed checkpoint's


def _launch_hint(cfg: JobConfig, world_size: int) -> str:
    """How to launch a layout that does not fit `world_size` ranks (the smallest world it fits)."""
    pcfg = cfg.parallel
    if pcfg.dp_shard == -1:
        needed = pcfg.pp * pcfg.dp_replicate * math.lcm(pcfg.ep, pcfg.cp * pcfg.tp)
    else:
        needed = pcfg.pp * pcfg.dp_replicate * pcfg.dp_shard * pcfg.cp * pcfg.tp
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "recipes/pretrain.py"
    launched = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ else None
    if world_size == 1 and launched is None:
        return (
            f"; {script} was started as one plain process, but this layout needs {needed} (parallel.ep="
            f"{pcfg.ep}, cp={pcfg.cp}, dp_replicate={pcfg.dp_replicate}, pp={pcfg.pp}): launch it with "
            f"`torchrun --nproc-per-node {needed} {script} ...`, or run on one process with `parallel=single`"
        )
    return f"; the smallest world this layout fits is {needed} ranks (`torchrun --nproc-per-node {needed}`)"


def check_layout(cfg: JobConfig, world_size: int) -> parallel.ParallelDims:
    """The layout of `cfg` on `world_size` ranks, checked from the config alone: the degrees multiply to the
    world size, the sequence splits over CP, and the global batch splits into micro-batches on every
    data-parallel rank. ValueError naming the keys, with how to launch a layout that needs another world size."""
    pcfg, train = cfg.parallel, cfg.train
    try:
        dims = parallel.ParallelDims(
            world_size=world_size,
            dp_replicate=pcfg.dp_replicate,
            dp_shard=pcfg.dp_shard,
            cp=pcfg.cp,
            ep=pcfg.ep,
            pp=pcfg.pp,
            tp=pcfg.tp,
            num_experts=cfg.model.moe.num_experts if cfg.model.num_moe_layers else None,
        )
    except ValueError as e:
        raise ValueError(f"{e}{_launch_hint(cfg, world_size)}") from None
    check_sequence_split(cfg.data.seq_len, pcfg.cp)
    check_tensor_parallel(cfg.model, tp=pcfg.tp, seq_len=cfg.data.seq_len, cp=pcfg.cp)
    dp = dims.data_parallel
    if train.global_batch_size % (train.micro_batch_size * dp):
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by micro_batch_size="
            f"{train.micro_batch_size} x dp_size={dp} = {train.micro_batch_size * dp} (train.micro_batch_size x "
            f"the data-parallel ranks dp_replicate*dp_shard = {dims.dp_replicate}*{dims.dp_shard}): every "
            "data-parallel rank runs whole micro-batches of each global batch; change one of them"
        )
    check_pipeline(
        cfg.model, pcfg, num_micro_batches=train.global_batch_size // (train.micro_batch_size * dp)
    )
    return dims


def plan_start(cfg: JobConfig, env: parallel.DistEnv) -> StartPlan:
    """Validate the layout and what to load, and find how much is left to train; ValueError when refused.

    Reads only the config, the world size and checkpoint metadata files, so every rank reaches the same verdict
    without a collective (`automoe.train.launch` gathers the verdicts and reports them once).
    """
    train = cfg.train
    ckpt_root = Path(cfg.output_dir) / "checkpoints"
    dims = check_layout(cfg, env.world_size)
    check_data_tokenizer(cfg)  # the data's tokenizer is the model's (names both when not)
    plan = StartPlan(dims=dims)
    plan.resume_path = resolve_resume(cfg.checkpoint.resume, ckpt_root)
    if plan.resume_path is not None:
        plan.start_step = saved_step(plan.resume_path)
        plan.changes = config_changes(
            plan.resume_path, config_to_yaml(cfg), ignore=("checkpoint.resume", "checkpoint.init_from")
        )
    else:
        if cfg.checkpoint.init_from is not None:
            plan.init_path = check_step_dir(cfg.checkpoint.init_from, key="checkpoint.init_from")
    if plan.resume_path is not None or plan.init_path is not None:  # a shape mismatch is refused here, once
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in Transformer(cfg.model).state_dict().items()}
        check_model_shapes(plan.resume_path or plan.init_path, expected, config_yaml=config_to_yaml(cfg))
    if plan.resume_path is None:
        plan.hf_init, notes = _check_hf_init(cfg)
        plan.warnings += notes
    last = train.stop_at_step or train.steps
    if plan.start_step >= train.steps:
        plan.done = (
            f"the run is complete: {plan.resume_path} is step {plan.start_step} and train.steps="
            f"{train.steps}, so there is nothing to train. To train further, raise train.steps, e.g. "
            f"`train.steps={2 * plan.start_step} checkpoint.resume=latest` (the lr schedule then spans the new "
            "length: see docs/checkpoints.md); to start over, use another output_dir"
        )
    elif plan.start_step >= last:
        plan.done = (
            f"train.stop_at_step={train.stop_at_step} is already reached ({plan.resume_path} is step "
            f"{plan.start_step}): nothing to train in this invocation; raise train.stop_at_step or drop it to "
            f"continue to train.steps={train.steps}"
        )
    if cfg.optim.warmup_steps >= train.steps:
        plan.warnings.append(
            f"optim.warmup_steps={cfg.optim.warmup_steps} >= train.steps={train.steps}: the learning rate is "
            f"still warming up at the last step (it never reaches optim.lr={cfg.optim.lr} and never decays)"
        )
    return plan


def build_trainer(
    cfg: JobConfig,
    env: parallel.DistEnv,
    *,
    faults: FaultHooks | None = None,
    plan: StartPlan | None = None,
) -> Trainer:
    """Everything `Trainer.fit` needs, on every rank. Raises ValueError for bad settings before training starts.

    `plan`: from `plan_start` (computed here when not given). `faults`: fault-injection hooks for the
    reliability tests; default: from `AUTOMOE_FAULT` (unset: none).
    """
    if faults is None:
        faults = from_env(rank=env.rank)
    # 1. validate the layout and what to load (no collective has run yet)
    if plan is None:
        plan = plan_start(cfg, env)
        for warning in plan.warnings if env.is_main else ():
            logger.warning(warning)
    pcfg, train, dims = cfg.parallel, cfg.train, plan.dims
    output_dir = Path(cfg.output_dir)
    ckpt_root = output_dir / "checkpoints"
    set_deterministic(train.deterministic)  # before the first GEMM (cuBLAS reads its workspace setting once)
    # 2. data: the same datasets on every rank; the loader takes this rank's slice of each global batch
    train_ds, val_ds = build_datasets(cfg.data, data_tokenizer(cfg))
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
    seed_all(train.seed)  # torch (the init), Python's and numpy's global RNGs: train.seed seeds every RNG
    parallel.init_weights(model, dims)  # also fills the non-persistent buffers (RoPE tables, load counters)
    pipeline = None
    if dims.pp_enabled:  # this rank's stages and the schedule that runs them
        pipeline = parallel.Pipeline(
            model,
            dims,
            pcfg,
            num_micro_batches=train.global_batch_size // (train.micro_batch_size * dims.data_parallel),
            micro_batch_shape=(train.micro_batch_size, cfg.data.seq_len // pcfg.cp),
            device=env.device,
        )
    not_loaded: tuple[str, ...] = ()
    if (
        plan.hf_init is not None
    ):  # HF weights overwrite every parameter; each rank reads only its shard's experts
        not_loaded = _load_hf_init(model, plan.hf_init)
    model.train()
    counts = num_params(model)
    logger.info("model: %.2fM parameters, %.2fM active per token", counts.total / 1e6, counts.active / 1e6)
    # 4. optimizer, schedule, checkpointer; then restore a checkpoint into them (this run's settings win)
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
    if plan.resume_path is not None:
        start_step = checkpointer.load(
            plan.resume_path, model=model, optimizer=optimizer, scheduler=scheduler, loader=loader
        )
        apply_optim_config(model, optimizer, scheduler, cfg.optim, total_steps=train.steps)
        if plan.changes and env.is_main:
            logger.warning(
                "resuming %s with settings that differ from its config.yaml (this run's values are used; the "
                "step, moments, data position and RNG come from the checkpoint): %s",
                plan.resume_path,
                "; ".join(plan.changes),
            )
    elif plan.init_path is not None:
        checkpointer.load_weights(
            plan.init_path, model=model, optimizer=optimizer if cfg.checkpoint.init_optimizer else None
        )
        apply_optim_config(model, optimizer, scheduler, cfg.optim, total_steps=train.steps)
    elif cfg.checkpoint.resume == "latest":  # nothing to resume: a fresh run (from an init_from if set)
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
        init_from_weights=any(x is not None for x in (plan.resume_path, plan.init_path, plan.hf_init)),
        not_loaded=not_loaded,
        pipeline=pipeline,
    )

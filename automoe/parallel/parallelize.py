"""`parallelize`: the one place where every parallelism is applied to a (meta-device) model, in order."""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn

from automoe.config.parallel import ParallelConfig
from automoe.moe.layer import moe_layers
from automoe.parallel.activation_checkpoint import apply_ac
from automoe.parallel.compile import apply_compile
from automoe.parallel.context_parallel import DistributedStatsReducer, apply_cp
from automoe.parallel.dims import ParallelDims
from automoe.parallel.expert_parallel import apply_ep
from automoe.parallel.fsdp import apply_fsdp
from automoe.parallel.pipeline import apply_pp
from automoe.parallel.tensor_parallel import apply_tp

logger = logging.getLogger(__name__)


def apply_stats_reducers(model: nn.Module, dims: ParallelDims) -> None:
    """Per-sequence statistics over the CP x TP group (the ranks holding pieces of the same sequences),
    global-batch statistics over every rank of the pipeline stage."""
    sequence_group = None
    if dims.cp_enabled and dims.tp_enabled:
        sequence_group = dims.sequence_mesh.get_group()
    elif dims.cp_enabled or dims.tp_enabled:
        sequence_group = (dims.cp_mesh if dims.cp_enabled else dims.tp_mesh).get_group()
    batch_group = dims.all_data_mesh.get_group() if dims.pp_enabled else dist.group.WORLD
    for _, layer in moe_layers(model):
        layer.reducer = DistributedStatsReducer(sequence_group=sequence_group, batch_group=batch_group)


def parallelize(model: nn.Module, dims: ParallelDims, pcfg: ParallelConfig) -> None:
    """Apply the layout in `dims` and the knobs in `pcfg` to a model (normally still on the meta device)."""
    if dims.world_size > 1:
        # 0. pipeline parallelism: keep only this rank's stages (blocks, embedding / head)
        if dims.pp_enabled:
            apply_pp(model, dims, pcfg)
        # 1. tensor parallelism: DTensor plans for the dense parts, each tp rank routes its slice of the sequence
        if dims.tp_enabled:
            apply_tp(model, dims.tp_mesh)
        # 2. context parallelism: attention K/V gather + CP- and TP-aware routing statistics
        if dims.cp_enabled:
            apply_cp(model, dims)
        apply_stats_reducers(model, dims)
        # 3. expert parallelism: shard experts over `ep`, all-to-all dispatch
        if dims.ep_enabled:
            apply_ep(model, dims.ep_mesh)
    # 4. activation checkpointing (before compile and FSDP, which wrap what it wraps)
    apply_ac(model, pcfg.activation_checkpointing)
    # 5. torch.compile per block
    if pcfg.compile:
        apply_compile(model)
    # 6. FSDP2 last: it shards whatever parameters the steps above left
    if dims.world_size > 1 and pcfg.fsdp:
        if dims.tp_enabled and dims.stage_size == dims.tp:
            # no data-parallel rank to shard over
            logger.warning("parallel.fsdp=true has no effect: every rank of the stage is a tp rank")
        else:
            apply_fsdp(model, dims, param_dtype=pcfg.fsdp_param_dtype)

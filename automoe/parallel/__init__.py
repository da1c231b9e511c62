"""Distributed execution: meshes, expert / context / data parallelism, and gradient bookkeeping."""

from automoe.config.parallel import ParallelConfig
from automoe.parallel.context_parallel import shard_sequence
from automoe.parallel.dims import ParallelDims
from automoe.parallel.env import DistEnv, init_distributed, shutdown_distributed
from automoe.parallel.grads import clip_grad_norm_, finalize_grads, loss_scale, sum_over_ranks, sum_over_stage
from automoe.parallel.parallelize import parallelize
from automoe.parallel.pipeline import Pipeline, gather_over_stages, init_stage_weights


def cp_shard_batch(batch: dict, dims: ParallelDims, *, load_balance: bool = True) -> dict:
    """This rank's sequence chunk of a micro-batch, with global `positions` (identity + arange at cp=1)."""
    cp_rank = dims.cp_mesh.get_local_rank() if dims.cp_enabled else 0
    return shard_sequence(batch, cp_rank=cp_rank, cp=dims.cp, load_balance=load_balance and dims.cp_enabled)


def init_weights(model, dims: ParallelDims) -> None:
    """The one layout-invariant initializer (`Transformer.init_weights`); a pipeline stage gets its part."""
    if dims.pp_enabled:
        init_stage_weights(model)
    else:
        model.init_weights()


__all__ = [
    "DistEnv",
    "Pipeline",
    "ParallelConfig",
    "ParallelDims",
    "clip_grad_norm_",
    "cp_shard_batch",
    "finalize_grads",
    "gather_over_stages",
    "init_weights",
    "init_distributed",
    "loss_scale",
    "parallelize",
    "shutdown_distributed",
    "sum_over_ranks",
    "sum_over_stage",
]

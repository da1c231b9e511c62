"""FSDP2: dense parameters sharded over dp_shard x cp (HSDP with dp_replicate), experts over ep_shard."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from automoe.parallel.dims import ParallelDims
from automoe.parallel.sharded_init import install_sharded_init
from automoe.tensors import local_view, torch_dtype

logger = logging.getLogger(__name__)


def apply_fsdp(model: nn.Module, dims: ParallelDims, *, param_dtype: str = "float32") -> None:
    """`fully_shard` every block (experts first, on the expert mesh when EP is on), then the root.

    Mixed precision gathers parameters in `param_dtype` and reduces gradients in fp32; sharded master
    parameters stay fp32.
    """
    install_sharded_init()
    mp = MixedPrecisionPolicy()
    if param_dtype != "float32":
        mp = MixedPrecisionPolicy(param_dtype=torch_dtype(param_dtype), reduce_dtype=torch.float32)
    dense_mesh = dims.fsdp_mesh
    # One rank per expert shard (no ep_shard / dp_replicate) and fp32 compute: FSDP over that single rank would only
    # copy every expert weight in and out (all-gather in forward and again in backward, a reduce-scatter of the
    # grads), ~4 weight-sized copies a step for nothing. Those parameters are left to the DTensor ep sharding.
    skip_experts = dims.ep_enabled and dims.expert_fsdp_mesh.size() == 1 and param_dtype == "float32"
    ignored: set[nn.Parameter] = set()
    blocks = list(model.layers.values())
    if getattr(model, "mtp", None) is not None:  # DeepSeek-V3 MTP: one more block per depth
        blocks += [depth.block for depth in model.mtp.depths.values()]
    for block in blocks:
        moe = getattr(block, "moe", None)
        if moe is not None and skip_experts:
            ignored |= set(moe.experts.parameters())
        elif moe is not None and dims.ep_enabled:
            # expert weights are already Shard(0) over ep: FSDP adds sharding over the expert-data axis
            fully_shard(
                moe.experts,
                mesh=dims.expert_fsdp_mesh,
                mp_policy=mp,
                reshard_after_forward=True,
                shard_placement_fn=_expert_placement(dims.ep_shard),
            )
        fully_shard(block, mesh=dense_mesh, mp_policy=mp, ignored_params=ignored & set(block.parameters()))
    if dims.pp_enabled:
        # a pipeline stage runs its pieces (`pipeline.StageModule`), never the model's forward: the embedding and
        # the norm and the head get their own units, and each unit is the root of its own forward/backward
        if model.tok_embeddings is not None:
            fully_shard(model.tok_embeddings, mesh=dense_mesh, mp_policy=mp)
        if model.output is not None:
            fully_shard(model.norm, mesh=dense_mesh, mp_policy=mp)
            fully_shard(model.output, mesh=dense_mesh, mp_policy=mp)
    else:
        fully_shard(model, mesh=dense_mesh, mp_policy=mp, ignored_params=ignored)
    logger.info("applied FSDP2 over %s (params gathered in %s)", dense_mesh.mesh_dim_names, param_dtype)


def _expert_placement(num_shards: int):
    """Shard experts along dim 0 while each rank keeps >= 1 whole expert; otherwise along dim 1.

    With fewer local experts than expert-data ranks, dim-0 sharding would leave ranks holding padding only.
    """

    def placement(param: nn.Parameter):
        local = local_view(param)
        return Shard(1) if local.shape[0] < num_shards and local.dim() > 1 else None

    return placement

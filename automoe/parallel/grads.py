"""Gradient bookkeeping across layouts: the loss scale, the final gradient reductions, and one global clip norm.

Convention: each rank's loss is its share of the global objective, scaled by `loss_scale` (the ranks of its
pipeline stage: the world size without PP) before backward. FSDP then averages over the data ranks, which turns the
scaled shares back into the exact sum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from automoe.moe.layer import moe_layers
from automoe.parallel import flight_recorder
from automoe.parallel.dims import TP, ParallelDims


def loss_scale(dims: ParallelDims) -> float:
    """Multiply every micro-batch loss by this before backward: gradient reductions average over the ranks of a
    pipeline stage (every rank without PP)."""
    return float(dims.stage_size)


def sum_over_ranks(t: Tensor, dims: ParallelDims) -> Tensor:
    """All-reduce SUM of a statistic over every rank (identity on one process)."""
    if dims.world_size == 1:
        return t
    out = t.detach().clone()
    with flight_recorder.collective("all_reduce (sum over ranks)", None, out):
        dist.all_reduce(out)
    return out


def sum_over_stage(t: Tensor, dims: ParallelDims) -> Tensor:
    """All-reduce SUM over the ranks of this pipeline stage (= `sum_over_ranks` when pp=1): statistics of the
    stage's own layers (expert loads, dropped slots) and of the data (token counts), which every stage sees."""
    if not dims.pp_enabled:
        return sum_over_ranks(t, dims)
    out = t.detach().clone()
    group = dims.all_data_mesh.get_group()
    with flight_recorder.collective("all_reduce (sum over the stage)", group, out):
        dist.all_reduce(out, group=group)
    return out


def is_tensor_parallel(p: Tensor) -> bool:
    """Whether `p` is a DTensor sharded or replicated over the tp mesh axis (`apply_tp`)."""
    return isinstance(p, DTensor) and TP in (p.device_mesh.mesh_dim_names or ())


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, layer in moe_layers(model) for p in layer.experts.parameters()]


@torch.no_grad()
def finalize_grads(model: nn.Module, dims: ParallelDims) -> None:
    """Finish the step's gradient reductions so every gradient equals the single-process one.

    1. Without FSDP, average plain (replicated) gradients over the ranks of the pipeline stage (all ranks without
       PP) and expert gradients over the ranks that hold the same experts (dp_replicate x ep_shard); with FSDP
       (`apply_fsdp` made the root, or under PP each block, an `FSDPModule`) the reduce-scatter already did this.
    2. Expert gradients arrive ep-times too large: the all-to-all backward already summed the contributions of the
       ep group, and the average above divides only by the expert-data degree.
    3. Tensor-parallel parameters (DTensors on the tp axis) hold a different shard on each tp rank, each already
       the whole gradient of its rank's loss (the collectives' backward summed over tp, and every tp rank's loss
       is its data rank's): they average over the ranks holding the same shard and divide by tp (the loss scale
       counts the tp ranks). Everything else (the MoE layer: each tp rank routes its own tokens) averages over
       the whole stage, which sums its tp ranks' parts.
    """
    if dims.world_size == 1:
        return
    _shard_replicated_grads(model)
    experts = {id(p) for p in expert_parameters(model)}
    stage_group = dims.all_data_mesh.get_group() if dims.pp_enabled else None  # None: the default group
    if not any(isinstance(m, FSDPModule) for m in model.modules()):  # else FSDP reduce-scatters the gradients
        expert_group = dims.expert_fsdp_mesh
        for p in model.parameters():
            if p.grad is None:
                continue
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if id(p) in experts and dims.ep_enabled:
                if expert_group.size() > 1:
                    _all_reduce_avg(grad, expert_group)
            elif is_tensor_parallel(p):
                replicas = dims.dense_replica_mesh
                if replicas.size() > 1:
                    _all_reduce_avg(grad, replicas)
                grad.div_(dims.tp)
            else:
                with flight_recorder.collective("all_reduce (gradient avg)", stage_group, grad):
                    dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=stage_group)
    elif dims.tp_enabled:  # FSDP averaged over the data ranks of each tp shard only
        _finish_tp_after_fsdp(model, dims, experts)
    if dims.ep_enabled:
        for p in expert_parameters(model):
            if p.grad is not None:
                p.grad.div_(dims.ep)


def _shard_replicated_grads(model: nn.Module) -> None:
    """A sharded DTensor parameter whose gradient came back replicated keeps only its own shard of it.

    DTensor's embedding backward returns the whole `[V, D]` gradient, replicated over tp, for the vocab-sharded
    `tok_embeddings.weight`: slicing it (no communication: every tp rank holds the same values) makes the reductions
    below, the clipping and the optimizer work on V/tp rows, as for every other tp-sharded parameter.
    """
    for p in model.parameters():
        grad = p.grad
        if (
            isinstance(p, DTensor)
            and isinstance(grad, DTensor)
            and grad.placements != p.placements
            and all(isinstance(g, Replicate) for g in grad.placements)
        ):
            p.grad = grad.redistribute(p.device_mesh, p.placements)


def _finish_tp_after_fsdp(model: nn.Module, dims: ParallelDims, experts: set[int]) -> None:
    """FSDP x TP: FSDP's reduce-scatter averaged each gradient over the data ranks holding the same tp shard; a
    tp-parallel gradient is then tp times too large (÷ tp), and every other one (the MoE layer's, each tp rank's part
    from its own tokens) still lacks the sum over its tp ranks (average over tp: the loss scale counts them)."""
    tp_group = dims.tp_mesh.get_group()
    for p in model.parameters():
        if p.grad is None or (id(p) in experts and dims.ep_enabled):
            continue
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if is_tensor_parallel(p):
            grad.div_(dims.tp)
        else:
            with flight_recorder.collective("all_reduce (gradient avg over tp)", tp_group, grad):
                dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=tp_group)


def _mesh_group(mesh) -> dist.ProcessGroup | str:
    """The group of a 1-D mesh, or a name for an N-D one (a flight-recorder label)."""
    return (
        mesh.get_group()
        if mesh.ndim == 1
        else f"mesh{list(mesh.mesh_dim_names or ())}{mesh.mesh.flatten().tolist()}"
    )


def _all_reduce_avg(t: Tensor, mesh) -> None:
    if mesh.ndim == 1:
        with flight_recorder.collective("all_reduce (expert gradient avg)", mesh.get_group(), t):
            dist.all_reduce(t, op=dist.ReduceOp.AVG, group=mesh.get_group())
        return
    for axis in range(mesh.ndim):
        with flight_recorder.collective("all_reduce (expert gradient avg)", mesh.get_group(axis), t):
            dist.all_reduce(t, op=dist.ReduceOp.AVG, group=mesh.get_group(axis))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, *, dims: ParallelDims | None = None) -> Tensor:
    """Clip all gradients to one global L2 norm and return it (max_norm <= 0: only compute the norm).

    Parameters live on different meshes (dense FSDP mesh, expert mesh) or are plain tensors; torch's
    `clip_grad_norm_` refuses to mix them, so norms are taken per mesh, reduced, and combined. Under pipeline
    parallelism (`dims.pp > 1`) each stage holds other parameters: the squared norms are summed over the stages.
    """
    groups: dict[object, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(mesh, []).append(p)
    squares = []
    for params in groups.values():
        norm = get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            with flight_recorder.collective(
                "all_reduce (grad norm, DTensor)", _mesh_group(norm.device_mesh), norm
            ):
                norm = norm.full_tensor()
        squares.append(norm.float().square())
    square = torch.stack(squares).sum() if squares else torch.zeros(())
    if dims is not None and dims.pp_enabled:
        group = dims.pp_mesh.get_group()
        with flight_recorder.collective("all_reduce (grad norm over stages)", group, square):
            dist.all_reduce(square, group=group)
    elif not squares:
        return square
    total = square.sqrt()
    if max_norm > 0:
        for params in groups.values():
            clip_grads_with_norm_(params, max_norm, total)
    return total

"""Tensor parallelism (Megatron-style, with sequence parallelism): DTensor `parallelize_module` plans for the
embedding, attention, the dense MLP and the output head; the MoE layer gets this rank's slice of the sequence.

Between blocks the residual stream is sequence-sharded over the tp ranks ([B, S/tp, D] local). Attention and the
dense MLP all-gather it (column-parallel in-projections: a slice of the heads / hidden units per rank) and
reduce-scatter their output (row-parallel out-projection). The MoE layer is not tensor-parallel: each tp rank
routes its own S/tp tokens (no token is routed twice), so the router's gradient is a sum over tp (the gradient
reduction over the pipeline stage includes the tp ranks) and its statistics reduce over cp x tp (one sequence).
"""

from __future__ import annotations

import logging

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from automoe.config.model import ModelConfig
from automoe.parallel.sharded_init import install_sharded_init

logger = logging.getLogger(__name__)

# Block.forward's sequence-shaped keyword tensors the MoE layer reads ([B, S]: cut to this rank's slice)
_MOE_SEQUENCE_KWARGS = ("padding_mask_BS", "document_ids_BS")


def check_tensor_parallel(model: ModelConfig, *, tp: int, seq_len: int | None = None, cp: int = 1) -> None:
    """Refuse a model / layout tensor parallelism cannot shard, naming the setting (before any collective)."""
    if tp == 1:
        return
    unsupported = {
        "model.attention_sinks=true": model.attention_sinks,
        "model.qk_norm_scope='projection'": model.qk_norm and model.qk_norm_scope != "head",
        "model.tie_embeddings=true": model.tie_embeddings,
        f"model.mtp_layers={model.mtp_layers}": model.mtp_layers > 0,
    }
    for setting, hit in unsupported.items():
        if hit:
            raise ValueError(f"parallel.tp={tp} does not support {setting} yet; use parallel.tp=1")
    shared = (
        ("num_heads", "ffn_inter_dim")
        if model.attention == "mla"
        else ("num_heads", "num_kv_heads", "ffn_inter_dim")
    )
    for name in shared:  # (the vocabulary may split unevenly)
        value = getattr(model, name)
        if value % tp:
            raise ValueError(
                f"model.{name}={value} is not divisible by parallel.tp={tp}: tensor parallelism gives every tp "
                f"rank the same share of {name}"
            )
    if seq_len is not None and seq_len % (cp * tp):
        raise ValueError(
            f"data.seq_len={seq_len} is not divisible by parallel.cp*tp = {cp}*{tp} = {cp * tp}: sequence "
            "parallelism splits each rank's (CP) chunk of the sequence over the tp ranks"
        )


class SequenceSlice:
    """Forward pre-hook of the MoE layer: cut its [B, S] keyword tensors (padding mask, document ids) to this tp
    rank's slice of the sequence, the slice its hidden states hold (`Shard(1)`: chunk `rank` of `size`)."""

    def __init__(self, *, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for name in _MOE_SEQUENCE_KWARGS:
            t: Tensor | None = kwargs.get(name)
            if t is not None:
                chunk = t.shape[1] // self.size
                kwargs[name] = t[:, self.rank * chunk : (self.rank + 1) * chunk]
        return args, kwargs


def _to_local_partial_grad(module: nn.Module, args: tuple) -> tuple:
    """Pre-hook of MLA's replicated down-projections: the all-gathered DTensor input as a plain tensor whose
    gradient (this rank's heads only) is a Partial sum, added to the other projections' before one reduce-scatter."""
    x = args[0]
    return (x.to_local(grad_placements=[Partial()]) if isinstance(x, DTensor) else x, *args[1:])


def _replicated_input_partial_grad(mesh: DeviceMesh):
    """Pre-hook of MLA's column-parallel up-projections: the replicated latent (same values on every tp rank)
    whose gradient stays a per-rank Partial (this rank's heads), like the shared RoPE key's, so every replicated
    MLA parameter gets a per-rank part that the stage-wide gradient average sums over tp."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = DTensor.from_local(args[0], mesh, [Replicate()], run_check=False, grad_placements=[Partial()])
        return (x, *args[1:])

    return hook


def _mla_plan(attention: nn.Module, mesh: DeviceMesh) -> dict:
    """MLA: the low-rank down-projections (q_a, kv_a: latent and shared RoPE key) and their norms stay plain and
    replicated; the per-head up-projections are column-parallel and o_proj row-parallel."""
    for proj in (attention.q_a_proj, attention.kv_a_proj):
        if proj is not None:
            proj.register_forward_pre_hook(_to_local_partial_grad)
    for proj in (attention.q_b_proj, attention.kv_b_proj):
        if proj is not None:
            proj.register_forward_pre_hook(_replicated_input_partial_grad(mesh))
    plan = {"attention.kv_b_proj": ColwiseParallel()}
    if attention.q_proj is not None:
        plan["attention.q_proj"] = ColwiseParallel()
    else:
        plan["attention.q_b_proj"] = ColwiseParallel()
    return plan


def _block_plan(block: nn.Module, mesh: DeviceMesh) -> dict:
    if hasattr(block.attention, "kv_b_proj"):  # MLA
        projections = _mla_plan(block.attention, mesh)
    else:
        projections = {
            "attention.q_proj": ColwiseParallel(),
            "attention.k_proj": ColwiseParallel(),
            "attention.v_proj": ColwiseParallel(),
        }
    plan = {
        "attention_norm": SequenceParallel(use_local_output=True),
        # x all-gathered over the sequence, kept a DTensor so the gradients q/k/v_proj put on it add up as one
        # Partial and go back in one reduce-scatter; cos / sin (and the keyword tensors) are already whole
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None),
            desired_input_layouts=(Replicate(), None, None),
            use_local_output=False,
        ),
        **projections,
        "attention.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(use_local_output=True),
    }
    if block.feed_forward is not None:
        plan |= {
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=False
            ),
            "feed_forward.gate_proj": ColwiseParallel(),
            "feed_forward.up_proj": ColwiseParallel(),
            "feed_forward.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard the dense parts of `model` (or of this pipeline stage's part) over `tp_mesh`.

    Backward of the collectives: the all-gather before attention / MLP / head reduce-scatters its gradient, the
    reduce-scatter after them all-gathers it; replicated norm weights get their gradients summed over tp.
    """
    install_sharded_init()
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    if model.tok_embeddings is not None:  # None on a pipeline stage without the embedding
        parallelize_module(
            model.tok_embeddings, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        )
    if model.output is not None:
        parallelize_module(model.norm, tp_mesh, SequenceParallel(use_local_output=True))
        # logits whole on every tp rank: each computes the same cross-entropy (counted once, `automoe.train.loss`)
        parallelize_module(
            model.output, tp_mesh, ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
        )
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, tp_mesh))
        attention = block.attention
        attention.num_heads //= tp  # the module now computes its local heads
        if hasattr(attention, "num_kv_heads"):
            attention.num_kv_heads //= tp
        if block.moe is not None:
            block.moe.register_forward_pre_hook(SequenceSlice(rank=rank, size=tp), with_kwargs=True)
    logger.info(
        "applied tensor parallelism: tp=%d (sequence-parallel norms, the MoE layer routes S/tp tokens)", tp
    )

"""Planner terms of pipeline parallelism: bubble fraction per schedule, micro-batches in flight (activation memory)
and the point-to-point bytes of one step, for the first pipeline rank (it holds the most activations).

Pure arithmetic, like the rest of the planner; the schedules are `torch.distributed.pipelining`'s as
`automoe.parallel.pipeline` drives them. Formulas: docs/planning.md#pipeline-parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

from automoe.config.model import ModelConfig
from automoe.config.parallel import PP_SCHEDULES
from automoe.planner.inputs import DTYPE_BYTES, ClusterSpec, TrainingShape
from automoe.planner.memory import Layout, activation_bytes


@dataclass(frozen=True)
class PipelineTerms:
    bubble_fraction: float  # idle share of a step on every pipeline rank: (pp - 1) / (v M + pp - 1)
    in_flight: float  # micro-batches whose whole-stage activations rank 0 holds at its peak
    activation_bytes: float  # rank 0's peak activation bytes (its blocks only, `in_flight` micro-batches)
    p2p_bytes: float  # bytes rank 0 receives per step (activations in, gradients back)
    p2p_seconds: float


def bubble_fraction(pp: int, micro_batches: int, *, virtual_stages: int = 1) -> float:
    """Idle share of a step: (pp - 1) / (v M + pp - 1), for GPipe and 1F1B (v = 1) and interleaved 1F1B (v chunks
    per rank shrink each fill/drain slot to 1/v of a stage's time)."""
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)


def in_flight_micro_batches(schedule: str, pp: int, micro_batches: int, *, virtual_stages: int = 1) -> float:
    """Micro-batches (in whole-rank units: a chunk of an interleaved rank is 1/v of it) whose activations rank 0
    keeps at once: GPipe all M forwards before any backward; 1F1B min(pp, M) warm-up forwards; interleaved
    1F1B (Megatron / torch warm-up of rank 0) min(v M, (v - 1) pp + 2 (pp - 1) + 1) chunks of 1/v each."""
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"pp_schedule={schedule!r} is not one of {list(PP_SCHEDULES)}")
    if schedule == "GPipe":
        return float(micro_batches)
    if schedule == "1F1B":
        return float(min(pp, micro_batches))
    v = virtual_stages
    chunks = min(v * micro_batches, (v - 1) * pp + 2 * (pp - 1) + 1)
    return chunks / v


def pipeline_terms(
    cfg: ModelConfig,
    shape: TrainingShape,
    layout: Layout,
    cluster: ClusterSpec,
    *,
    pp: int,
    schedule: str = "1F1B",
    virtual_stages: int = 1,
) -> PipelineTerms:
    """The pipeline's terms for `layout` (the degrees inside one stage) repeated over `pp` stages.

    Activations: a micro-batch's block activations (`activation_bytes`) times the share of blocks a rank holds
    (1/pp, blocks spread evenly) times `in_flight`. Point-to-point: each boundary moves one [B, S/cp, D] tensor
    in the compute dtype per micro-batch forward (activations) and one back (their gradients); rank 0 receives
    the gradients of its v chunk outputs and the activations of its v - 1 later chunks: (2v - 1) M messages.
    They cross nodes when a stage spans a node or more (pp is the outermost mesh axis).
    """
    M = shape.global_batch // (shape.micro_batch * layout.data_parallel)
    v = virtual_stages
    in_flight = in_flight_micro_batches(schedule, pp, M, virtual_stages=v)
    act = activation_bytes(cfg, shape, layout)
    rank0_act = act["blocks"] / pp * in_flight
    message = shape.micro_batch * shape.seq_len / layout.cp * cfg.dim * DTYPE_BYTES[shape.compute_dtype]
    p2p = (2 * v - 1) * M * message if pp > 1 else 0.0
    spans_nodes = layout.world_size >= cluster.gpus_per_node
    gbps = cluster.inter_node_gbps if spans_nodes else cluster.intra_node_gbps
    return PipelineTerms(
        bubble_fraction=bubble_fraction(pp, M, virtual_stages=v),
        in_flight=in_flight,
        activation_bytes=rank0_act,
        p2p_bytes=p2p,
        p2p_seconds=p2p / (1e9 * gbps),
    )

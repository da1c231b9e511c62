"""Planner terms of pipeline parallelism: the stage split, the bubble fraction per schedule, micro-batches in flight
per pipeline rank (activation memory) and the point-to-point bytes of one step.

Pure arithmetic, like the rest of the planner; the schedules are `torch.distributed.pipelining`'s as
`automoe.parallel.pipeline` drives them, and the split is its `balanced_split`. Formulas:
docs/planning.md#pipeline-parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from automoe.config.model import ModelConfig
from automoe.config.parallel import PP_SCHEDULES
from automoe.parallel.pipeline import balanced_split
from automoe.planner.inputs import DTYPE_BYTES, ClusterSpec, TrainingShape
from automoe.planner.memory import Layout, Stage, activation_bytes, param_inventory


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


def in_flight_micro_batches(
    schedule: str, pp: int, micro_batches: int, *, virtual_stages: int = 1, rank: int = 0
) -> float:
    """Micro-batches (in whole-rank units: a chunk of an interleaved rank is 1/v of it) whose activations pipeline
    rank `rank` keeps at once: GPipe all M forwards before any backward; 1F1B min(pp - rank, M) warm-up forwards;
    interleaved 1F1B (torch's `_get_warmup_ops`, plus the first steady-state forward)
    min(v M, (v - 1) m + 2 (pp - 1 - rank) + 1) chunks of 1/v each, m = M / max(1, M // pp) per round."""
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"pp_schedule={schedule!r} is not one of {list(PP_SCHEDULES)}")
    if schedule == "GPipe":
        return float(micro_batches)
    if schedule == "1F1B":
        return float(min(pp - rank, micro_batches))
    v = virtual_stages
    per_round = micro_batches // max(1, micro_batches // pp)
    chunks = min(v * micro_batches, (v - 1) * per_round + 2 * (pp - 1 - rank) + 1)
    return chunks / v


def interleaved_chunk_order(
    pp: int, micro_batches: int, virtual_stages: int, rank: int
) -> list[tuple[int, int]]:
    """(local chunk, +1 forward / -1 backward) in the order `ScheduleInterleaved1F1B` runs them on pipeline rank
    `rank`: torch's own warm-up count and 1F1B op list (`_get_warmup_ops`, `_get_1f1b_rank_ops`) with the stage
    index functions of `ScheduleInterleaved1F1B._calculate_single_rank_operations`."""
    from torch.distributed.pipelining import schedules

    v, M = virtual_stages, micro_batches
    per_round = M // max(1, M // pp)
    warmup = schedules._get_warmup_ops(rank, v, per_round, pp, M, multiply_factor=2)
    fwd_bwd = v * M - warmup

    def forward_stage(step: int) -> int:
        return ((step // per_round) % v) * pp + rank

    def backward_stage(step: int) -> int:
        return (v - 1 - ((step - warmup) // per_round) % v) * pp + rank

    actions = schedules._get_1f1b_rank_ops(
        v, pp, warmup, fwd_bwd, v * M - fwd_bwd, rank, forward_stage, backward_stage
    )
    forward = schedules._ComputationType.FORWARD
    return [
        (a.stage_index // pp, 1 if a.computation_type == forward else -1) for a in actions if a is not None
    ]


def peak_activation_bytes(
    schedule: str, pp: int, micro_batches: int, chunk_bytes: list[float], *, rank: int = 0
) -> float:
    """Peak bytes of the micro-batches in flight on pipeline rank `rank`, whose chunks (local stages, in order)
    save `chunk_bytes` per micro-batch: GPipe and 1F1B in whole-rank units (`in_flight_micro_batches`); interleaved
    1F1B by running the schedule's own op order (its chunks differ in size and in micro-batches held)."""
    if schedule != "Interleaved1F1B":
        return in_flight_micro_batches(schedule, pp, micro_batches, rank=rank) * sum(chunk_bytes)
    live = peak = 0.0
    for chunk, step in interleaved_chunk_order(pp, micro_batches, len(chunk_bytes), rank):
        live += step * chunk_bytes[chunk]
        peak = max(peak, live)
    return peak


def stage_blocks(cfg: ModelConfig, num_stages: int) -> list[tuple[int, ...]]:
    """Blocks of each of `num_stages` stages: `automoe.parallel.pipeline.balanced_split` over the blocks'
    parameter counts, the embedding counted on the first stage and norm + head on the last (what training does
    when `parallel.pp_layers_per_stage` is null)."""
    costs = [0] * cfg.num_layers
    for spec in param_inventory(cfg):
        if spec.block is not None and spec.block < cfg.num_layers:
            costs[spec.block] += math.prod(spec.shape)
    embed = cfg.vocab_size * cfg.dim
    sizes = balanced_split(costs, num_stages, first_extra=embed, last_extra=embed + cfg.dim)
    out, start = [], 0
    for n in sizes:
        out.append(tuple(range(start, start + n)))
        start += n
    return out


def rank_chunks(split: list[tuple[int, ...]], pp: int, rank: int) -> list[Stage]:
    """Pipeline rank `rank`'s local stages (chunks) in order, each with its blocks and end pieces."""
    return [Stage(split[s], first=s == 0, last=s == len(split) - 1) for s in range(rank, len(split), pp)]


def rank_stage(split: list[tuple[int, ...]], pp: int, rank: int) -> Stage:
    """What pipeline rank `rank` holds: stages rank, rank + pp, ... (loop placement), the embedding with stage 0
    and the norm + head with the last stage."""
    mine = range(rank, len(split), pp)
    return Stage(tuple(b for s in mine for b in split[s]), first=rank == 0, last=len(split) - 1 in mine)


def p2p_messages(pp: int, micro_batches: int, *, virtual_stages: int = 1, rank: int = 0) -> int:
    """[B, S/cp, D] tensors pipeline rank `rank` receives per step: an input and an output gradient per chunk and
    micro-batch, less the first stage's input (rank 0) and the last stage's gradient (rank pp - 1)."""
    if pp == 1:
        return 0
    ends = (rank == 0) + (rank == pp - 1)
    return (2 * virtual_stages - ends) * micro_batches


def p2p_bytes_per_message(cfg: ModelConfig, shape: TrainingShape, layout: Layout) -> float:
    """One stage boundary's tensor in the compute dtype: this rank's [B, S/(cp*tp), D] (under tp the residual
    stream between blocks is sequence-sharded, and each tp rank sends its own slice)."""
    tokens = shape.micro_batch * shape.seq_len / (layout.cp * layout.tp)
    return tokens * cfg.dim * DTYPE_BYTES[shape.compute_dtype]


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
    """The pipeline's terms for `layout` (the degrees inside one stage) repeated over `pp` stages, for rank 0.

    Activations: a micro-batch's block activations (`activation_bytes`) times the share of blocks a rank holds
    (1/pp, blocks spread evenly) times `in_flight`. Point-to-point: each boundary moves one [B, S/cp, D] tensor
    in the compute dtype per micro-batch forward (activations) and one back (their gradients); rank 0 receives
    the gradients of its v chunk outputs and the activations of its v - 1 later chunks: (2v - 1) M messages.
    They cross nodes when a stage spans a node or more (pp is the outermost mesh axis). `plan_layout` uses the
    exact split and every pipeline rank instead (`stage_blocks`, `rank_stage`).
    """
    M = shape.global_batch // (shape.micro_batch * layout.data_parallel)
    v = virtual_stages
    in_flight = in_flight_micro_batches(schedule, pp, M, virtual_stages=v)
    act = activation_bytes(cfg, shape, layout)
    rank0_act = act["blocks"] / pp * in_flight
    p2p = p2p_messages(pp, M, virtual_stages=v, rank=0) * p2p_bytes_per_message(cfg, shape, layout)
    spans_nodes = layout.stage_size >= cluster.gpus_per_node
    gbps = cluster.inter_node_gbps if spans_nodes else cluster.intra_node_gbps
    return PipelineTerms(
        bubble_fraction=bubble_fraction(pp, M, virtual_stages=v),
        in_flight=in_flight,
        activation_bytes=rank0_act,
        p2p_bytes=p2p,
        p2p_seconds=p2p / (1e9 * gbps),
    )

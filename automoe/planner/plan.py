"""Planner results: one layout (`plan_layout`), every candidate layout (`plan`), and the printed table."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from automoe.config.model import ModelConfig
from automoe.config.parallel import ParallelConfig
from automoe.parallel.dims import ParallelDims
from automoe.parallel.pipeline import check_pipeline
from automoe.parallel.tensor_parallel import check_tensor_parallel
from automoe.planner import pipeline as pipe
from automoe.planner.comm import _ring_seconds, a2a_rows, comm_per_step, micro_batches_per_step
from automoe.planner.inputs import DTYPE_BYTES, GIB, ClusterSpec, TrainingShape
from automoe.planner.memory import (
    Layout,
    Stage,
    activation_bytes,
    fsdp_unit_numel,
    moe_active_numel,
    param_counts,
    param_inventory,
    state_bytes,
)


# ---------------------------------------------------------------------------------------------------------------
# One layout, all layouts
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    layout: Layout
    micro_batches: int  # per rank per optimizer step
    memory: dict[str, float]  # bytes per rank: params, grads, optimizer, activations, fsdp_buffers, overhead
    comm: dict[str, dict[str, float]]  # per step: {collective: {bytes, seconds}}
    compute_s: float
    fits: bool
    a2a_rows_per_layer: dict[str, float] = field(default_factory=dict)  # one micro-batch forward, rank 0
    # pp > 1: schedule, stage_blocks, bubble_fraction, bubble_s, memory_rank (the pipeline rank `memory` is of:
    # the largest), in_flight (its micro-batches in flight), stage_memory (GiB per pipeline rank), time_rank (the
    # slowest pipeline rank, whose comm and compute are shown), p2p_bytes (received by it per step)
    pipeline: dict = field(default_factory=dict)

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def comm_bytes(self) -> float:
        return sum(c["bytes"] for c in self.comm.values())

    @property
    def comm_s(self) -> float:
        return sum(c["seconds"] for c in self.comm.values())

    @property
    def step_s(self) -> float:
        """Compute plus communication with no overlap, plus the pipeline bubble: an upper bound on the step time."""
        return self.compute_s + self.comm_s + self.pipeline.get("bubble_s", 0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            name=self.layout.name(),
            ep_shard=self.layout.ep_shard,
            memory_total=self.memory_total,
            comm_bytes=self.comm_bytes,
            comm_s=self.comm_s,
            step_s=self.step_s,
        )
        return d


def compute_seconds(
    cfg: ModelConfig,
    shape: TrainingShape,
    layout: Layout,
    cluster: ClusterSpec,
    *,
    stage: Stage | None = None,
) -> float:
    """Matmul FLOPs of one step on one rank / (peak * mfu): (6 + 2 under full AC) x active matmul params per
    token (MoE AC: + 2 x the MoE layers' active params), plus causal attention (3 or 4 passes of
    2 * (S/2) * H * (d_qk + d_v) per token and layer). A rank computes M * B * S / (cp * tp) tokens' worth (tp
    splits the dense matmuls and, sequence-parallel, the MoE tokens) of the blocks of `stage` (default: all)."""
    passes = 4 if shape.activation_checkpointing == "full" else 3
    if stage is None:
        counts = param_counts(cfg)
        matmul = counts.active - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
        recomputed = moe_active_numel(cfg) if shape.activation_checkpointing == "moe" else 0
        num_layers = cfg.num_layers
    else:
        matmul, recomputed = _stage_active_numel(cfg, stage, moe_ac=shape.activation_checkpointing == "moe")
        num_layers = len(stage.blocks)
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    attn = passes * 2 * (shape.seq_len / 2) * cfg.num_heads * (d_qk + d_v) * num_layers
    per_token = 2 * passes * matmul + 2 * recomputed + attn
    tokens = (
        micro_batches_per_step(shape, layout) * shape.micro_batch * shape.seq_len / (layout.cp * layout.tp)
    )
    return tokens * per_token / (cluster.peak_tflops * 1e12 * cluster.mfu)


def _stage_active_numel(cfg: ModelConfig, stage: Stage, *, moe_ac: bool) -> tuple[float, float]:
    """(matmul parameters one token uses in `stage`, those of its MoE layers): routed experts count K/E, the
    embedding lookup none."""
    share = cfg.moe.num_activated_experts / cfg.moe.num_experts if cfg.num_moe_layers else 0.0
    matmul = moe = 0.0
    for spec in param_inventory(cfg):
        if not stage.holds(spec) or spec.name.startswith("tok_embeddings."):
            continue
        n = math.prod(spec.shape) * (share if spec.expert else 1)
        matmul += n
        moe += n if ".moe." in spec.name else 0
    return matmul, moe if moe_ac else 0.0


def memory_per_rank(
    cfg: ModelConfig,
    shape: TrainingShape,
    layout: Layout,
    cluster: ClusterSpec,
    *,
    stage: Stage | None = None,
    in_flight: float = 1.0,
    rank: int = 0,
) -> dict:
    """Bytes on `rank` (default 0, which holds the largest FSDP chunks) holding `stage` (default: the whole
    model) with `in_flight` micro-batches' activations alive at its peak (pipeline schedules; 1 otherwise).
    FSDP buffers: the current and the prefetched block gathered in the compute dtype, one block's unsharded fp32
    gradients before their reduce-scatter, and the root's gathered parameters (kept through forward and
    backward); a tp rank's part of the TP-sharded tensors. Under pp, `apply_fsdp` makes every block (and the
    embedding, norm and head) an FSDP root of its own, and FSDP2 does not reshard a root after forward: the dense
    part of every block of the stage stays gathered (measured at pp2 x fsdp2); the experts, sharded with an explicit
    `reshard_after_forward=True`, do not."""
    mem: dict[str, float] = dict(state_bytes(cfg, shape, layout, rank=rank, stage=stage))
    act = activation_bytes(cfg, shape, layout, stage=stage)
    mem["activations"] = (act["blocks"] + act["head"]) * in_flight
    if shape.fsdp:
        units, a = fsdp_unit_numel(cfg, tp=layout.tp, stage=stage), DTYPE_BYTES[shape.compute_dtype]
        block = units["block_dense_max"] + units["block_expert_max"] / layout.ep
        mem["fsdp_buffers"] = (2 * a + 4) * block + a * units["root"]
        if layout.pp > 1:  # every block is its own FSDP root: gathered from its forward until its backward
            mem["fsdp_buffers"] += a * (units["blocks_dense_total"] - 2 * units["block_dense_max"])
    mem["overhead"] = cluster.overhead_gib * GIB
    return mem


def check_layout(cfg: ModelConfig, shape: TrainingShape, layout: Layout) -> int:
    """ValueError naming the setting when training would refuse `layout` (`ParallelDims`, `check_pipeline`,
    `check_tensor_parallel`); else the micro-batches per rank and step."""
    ParallelDims(
        world_size=layout.world_size,
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        cp=layout.cp,
        ep=layout.ep,
        pp=layout.pp,
        tp=layout.tp,
        num_experts=cfg.moe.num_experts if cfg.num_moe_layers else None,
    )
    tp_rules = {"tp": layout.tp, "seq_len": shape.seq_len, "cp": layout.cp}
    if "fsdp" in inspect.signature(check_tensor_parallel).parameters:  # while FSDP x TP is refused
        tp_rules |= {"fsdp": shape.fsdp, "replicas": layout.dp_replicate * layout.dp_shard * layout.cp}
    check_tensor_parallel(cfg, **tp_rules)
    if layout.cp > 1 and shape.seq_len % (2 * layout.cp):
        raise ValueError(f"seq_len={shape.seq_len} must be divisible by 2*cp = {2 * layout.cp} (zigzag CP)")
    M = micro_batches_per_step(shape, layout)
    if layout.pp > 1:
        v = shape.pp_virtual_stages
        if layout.pp * v > cfg.num_layers:  # before the split, which needs a block per stage
            raise ValueError(
                f"parallel.pp * parallel.pp_virtual_stages = {layout.pp}*{v} stages but model.num_layers="
                f"{cfg.num_layers}: every stage needs at least one block"
            )
        pcfg = ParallelConfig(
            pp=layout.pp,
            pp_schedule=shape.pp_schedule,
            pp_virtual_stages=v,
            pp_layers_per_stage=[len(b) for b in pipe.stage_blocks(cfg, layout.pp * v)],
            fsdp=shape.fsdp,
        )
        check_pipeline(cfg, pcfg, num_micro_batches=M)
    return M


def plan_layout(cfg: ModelConfig, shape: TrainingShape, layout: Layout, cluster: ClusterSpec) -> Plan:
    """Memory, communication and time of one layout (raises ValueError when the layout is impossible).

    Under pp > 1 every pipeline rank is planned with its own blocks and micro-batches in flight: `memory` is the
    fullest rank's, `comm` and `compute_s` the slowest rank's (plus its p2p), and the bubble adds
    (pp - 1) / (v M) of that rank's time (the slowest stage paces the pipeline)."""
    M = check_layout(cfg, shape, layout)
    T = shape.micro_batch * shape.seq_len / layout.cp
    rows = a2a_rows(cfg, T / layout.tp, layout.ep) if cfg.num_moe_layers else {}
    if layout.pp == 1:
        mem = memory_per_rank(cfg, shape, layout, cluster)
        return Plan(
            layout=layout,
            micro_batches=M,
            memory=mem,
            comm=comm_per_step(cfg, shape, layout, cluster),
            compute_s=compute_seconds(cfg, shape, layout, cluster),
            fits=sum(mem.values()) <= cluster.memory_gib * GIB,
            a2a_rows_per_layer=rows,
        )
    v, pp = shape.pp_virtual_stages, layout.pp
    split = pipe.stage_blocks(cfg, pp * v)
    message = pipe.p2p_bytes_per_message(cfg, shape, layout)
    per_rank = []
    for r in range(pp):
        stage = pipe.rank_stage(split, pp, r)
        act = [activation_bytes(cfg, shape, layout, stage=c) for c in pipe.rank_chunks(split, pp, r)]
        per_mb = [c["blocks"] + c["head"] for c in act]
        peak = pipe.peak_activation_bytes(shape.pp_schedule, pp, M, per_mb, rank=r)
        in_flight = peak / sum(per_mb)  # micro-batches in flight, in whole-rank units
        mem = memory_per_rank(
            cfg, shape, layout, cluster, stage=stage, in_flight=in_flight, rank=r * layout.stage_size
        )
        comm = comm_per_step(cfg, shape, layout, cluster, stage=stage)
        p2p = pipe.p2p_messages(pp, M, virtual_stages=v, rank=r) * message
        comm["pp_p2p"] = {"bytes": p2p, "seconds": _ring_seconds(p2p, [0, layout.stage_size], cluster)}
        compute = compute_seconds(cfg, shape, layout, cluster, stage=stage)
        per_rank.append((mem, comm, compute, in_flight))
    fullest = max(range(pp), key=lambda r: sum(per_rank[r][0].values()))
    slowest = max(
        range(pp), key=lambda r: per_rank[r][2] + sum(c["seconds"] for c in per_rank[r][1].values())
    )
    mem, _, _, in_flight = per_rank[fullest]
    _, comm, compute, _ = per_rank[slowest]
    busy = compute + sum(c["seconds"] for k, c in comm.items() if k != "pp_p2p")
    bubble = pipe.bubble_fraction(pp, M, virtual_stages=v)
    return Plan(
        layout=layout,
        micro_batches=M,
        memory=mem,
        comm=comm,
        compute_s=compute,
        fits=sum(mem.values()) <= cluster.memory_gib * GIB,
        a2a_rows_per_layer=rows,
        pipeline={
            "schedule": shape.pp_schedule,
            "virtual_stages": v,
            "stage_blocks": [list(b) for b in split],
            "bubble_fraction": bubble,
            "bubble_s": busy * bubble / (1 - bubble),
            "memory_rank": fullest,
            "in_flight": in_flight,
            "stage_memory_gib": [sum(m.values()) / GIB for m, *_ in per_rank],
            "time_rank": slowest,
            "p2p_bytes": comm["pp_p2p"]["bytes"],
        },
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    world_size: int,
    *,
    max_cp: int = 8,
    pp_degrees: tuple[int, ...] = (1,),
    tp_degrees: tuple[int, ...] = (1,),
) -> list[Layout]:
    """Every (pp, dp_replicate, dp_shard, cp, ep, tp) with pp in `pp_degrees` and tp in `tp_degrees` dividing the
    world, product pp*dp_replicate*dp_shard*cp*tp = world and ep | dp_shard*cp*tp."""
    out = []
    for pp in pp_degrees:
        for tp in tp_degrees:
            if world_size % (pp * tp):
                continue
            stage = world_size // (pp * tp)
            for R in _divisors(stage):
                for cp in _divisors(stage // R):
                    if cp > max_cp:
                        continue
                    dp_shard = stage // (R * cp)
                    out.extend(Layout(R, dp_shard, cp, ep, pp, tp) for ep in _divisors(dp_shard * cp * tp))
    return out


SORT_KEYS = {
    "step": lambda p: p.step_s,
    "comm": lambda p: p.comm_s,
    "memory": lambda p: p.memory_total,
}


def plan(
    cfg: ModelConfig,
    shape: TrainingShape,
    cluster: ClusterSpec,
    *,
    layouts: list[Layout] | None = None,
    max_cp: int = 8,
    pp_degrees: tuple[int, ...] = (1,),
    tp_degrees: tuple[int, ...] = (1,),
    sort_by: str = "step",
) -> tuple[list[Plan], list[tuple[Layout, str]]]:
    """Plans for every valid layout (fitting ones first, then by `sort_by`), and the rejected layouts with why."""
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by={sort_by!r} is not one of {list(SORT_KEYS)}")
    if layouts is None:
        layouts = candidate_layouts(
            cluster.world_size, max_cp=max_cp, pp_degrees=pp_degrees, tp_degrees=tp_degrees
        )
    plans, rejected = [], []
    for layout in layouts:
        try:
            plans.append(plan_layout(cfg, shape, layout, cluster))
        except ValueError as err:
            rejected.append((layout, str(err)))
    plans.sort(key=lambda p: (not p.fits, SORT_KEYS[sort_by](p)))
    return plans, rejected


def format_table(plans: list[Plan]) -> str:
    """One line per plan under a two-line header with units: the degrees; memory per rank in GiB (params, grads,
    optimizer state, activations, FSDP buffers, total; fit) of the fullest rank; communication per optimizer step
    in GB (expert all-to-all, FSDP/data-parallel, CP K/V, TP all-gather/reduce-scatter + TP grad all-reduce,
    PP p2p) and time per step in seconds (communication, compute, pipeline bubble, their sum) of the slowest
    rank."""
    segments = [
        f"{'pp':>3} {'rep':>4} {'shard':>5} {'cp':>3} {'tp':>3} {'ep':>3} {'eps':>4} {'mb':>4} ",
        f" {'param':>7} {'grad':>7} {'optim':>7} {'act':>7} {'fsdp':>6} {'total':>7} fit ",
        f" {'a2a':>8} {'fsdp':>8} {'cp':>7} {'tp':>7} {'pp':>6} ",
        f" {'comm':>7} {'comp':>7} {'bubble':>6} {'step':>7}",
    ]
    titles = ["degrees; mb: micro-batches", "memory per rank, GiB", "comm per step, GB", "time per step, s"]
    groups = "|".join(f" {t:<{len(seg) - 1}}" for t, seg in zip(titles, segments)).rstrip()
    head = "|".join(segments)
    lines = [groups, head, "-" * len(head)]
    for p in plans:
        L, m, c = p.layout, {k: v / GIB for k, v in p.memory.items()}, p.comm
        gb = {k: v["bytes"] / 1e9 for k, v in c.items()}
        named = ("expert_a2a", "cp_kv_allgather", "tp_activations", "tp_grad_allreduce", "pp_p2p")
        # fsdp column: FSDP collectives or, without FSDP, the data-parallel gradient all-reduces
        fsdp_gb = sum(v for k, v in gb.items() if k not in named)
        tp_gb = gb.get("tp_activations", 0.0) + gb.get("tp_grad_allreduce", 0.0)
        lines.append(
            f"{L.pp:>3} {L.dp_replicate:>4} {L.dp_shard:>5} {L.cp:>3} {L.tp:>3} {L.ep:>3} {L.ep_shard:>4} "
            f"{p.micro_batches:>4} | "
            f"{m['params']:>7.2f} {m['grads']:>7.2f} {m['optimizer']:>7.2f} {m['activations']:>7.2f} "
            f"{m.get('fsdp_buffers', 0.0):>6.2f} {p.memory_total / GIB:>7.2f} {'yes' if p.fits else ' NO'} | "
            f"{gb.get('expert_a2a', 0.0):>8.2f} {fsdp_gb:>8.2f} {gb.get('cp_kv_allgather', 0.0):>7.2f} "
            f"{tp_gb:>7.2f} {gb.get('pp_p2p', 0.0):>6.2f} | {p.comm_s:>7.3f} {p.compute_s:>7.3f} "
            f"{p.pipeline.get('bubble_s', 0.0):>6.2f} {p.step_s:>7.3f}"
        )
    return "\n".join(lines)


def launch_overrides(plan: Plan, shape: TrainingShape, *, model: str) -> list[str]:
    """The `recipes/pretrain.py` overrides that train `model` (a preset name or YAML path) with this plan's layout
    and `shape` (batch, sequence length, dtypes, activation checkpointing, FSDP)."""
    L = plan.layout
    out = [
        f"model={Path(model).stem}",  # a YAML path: put the file into configs/model/ first
        f"parallel.dp_replicate={L.dp_replicate}",
        f"parallel.dp_shard={L.dp_shard}",
        f"parallel.cp={L.cp}",
        f"parallel.ep={L.ep}",
        f"parallel.fsdp={'true' if shape.fsdp else 'false'}",
        *([f"parallel.tp={L.tp}"] if L.tp > 1 else []),
        *(
            [
                f"parallel.pp={L.pp}",
                f"parallel.pp_schedule={shape.pp_schedule}",
                f"parallel.pp_virtual_stages={shape.pp_virtual_stages}",
            ]
            if L.pp > 1
            else []
        ),
        f"parallel.activation_checkpointing={shape.activation_checkpointing}",
        f"train.global_batch_size={shape.global_batch}",
        f"train.micro_batch_size={shape.micro_batch}",
        f"data.seq_len={shape.seq_len}",
        f"model.dtype={shape.param_dtype}",
        f"train.dtype={shape.compute_dtype}",
    ]
    if shape.fsdp and shape.compute_dtype != shape.param_dtype:
        out.append(f"parallel.fsdp_param_dtype={shape.compute_dtype}")
    return out


def launch_command(plan: Plan, shape: TrainingShape, cluster: ClusterSpec, *, model: str) -> str:
    """A torchrun command line for one node of `cluster` (run it on every node; see docs/multinode.md)."""
    rdzv = (
        ' --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$JOB_ID"'
        if cluster.num_nodes > 1
        else " --standalone"
    )
    nodes = f" --nnodes {cluster.num_nodes}" if cluster.num_nodes > 1 else ""
    return (
        f"torchrun{nodes} --nproc-per-node {cluster.gpus_per_node}{rdzv} recipes/pretrain.py "
        + " ".join(launch_overrides(plan, shape, model=model))
        + " data.source=tokens data.path=DATA.bin output_dir=OUT"
    )

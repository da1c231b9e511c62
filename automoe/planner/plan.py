"""Planner results: one layout (`plan_layout`), every candidate layout (`plan`), and the printed table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from automoe.config.model import ModelConfig
from automoe.parallel.dims import ParallelDims
from automoe.planner.comm import a2a_rows, comm_per_step, micro_batches_per_step
from automoe.planner.inputs import DTYPE_BYTES, GIB, ClusterSpec, TrainingShape
from automoe.planner.memory import (
    Layout,
    activation_bytes,
    fsdp_unit_numel,
    moe_active_numel,
    param_counts,
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
        """Compute plus communication with no overlap: an upper bound on the step time."""
        return self.compute_s + self.comm_s

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


def compute_seconds(cfg: ModelConfig, shape: TrainingShape, layout: Layout, cluster: ClusterSpec) -> float:
    """Matmul FLOPs of one step on one rank / (peak * mfu): (6 + 2 under full AC) x active matmul params per
    token (MoE AC: + 2 x the MoE layers' active params), plus causal attention (3 or 4 passes of
    2 * (S/2) * H * (d_qk + d_v) per token and layer)."""
    counts = param_counts(cfg)
    matmul = counts.active - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    passes = 4 if shape.activation_checkpointing == "full" else 3
    recomputed = moe_active_numel(cfg) if shape.activation_checkpointing == "moe" else 0
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    attn = passes * 2 * (shape.seq_len / 2) * cfg.num_heads * (d_qk + d_v) * cfg.num_layers
    per_token = 2 * passes * matmul + 2 * recomputed + attn
    tokens = micro_batches_per_step(shape, layout) * shape.micro_batch * shape.seq_len / layout.cp
    return tokens * per_token / (cluster.peak_tflops * 1e12 * cluster.mfu)


def memory_per_rank(cfg: ModelConfig, shape: TrainingShape, layout: Layout, cluster: ClusterSpec) -> dict:
    """Bytes on rank 0 (which holds the largest FSDP chunks). FSDP buffers: the current and the prefetched
    block gathered in the compute dtype, one block's unsharded fp32 gradients before their reduce-scatter, and
    the root's gathered parameters (kept through forward and backward)."""
    mem: dict[str, float] = dict(state_bytes(cfg, shape, layout))
    act = activation_bytes(cfg, shape, layout)
    mem["activations"] = act["blocks"] + act["head"]
    if shape.fsdp:
        units, a = fsdp_unit_numel(cfg), DTYPE_BYTES[shape.compute_dtype]
        block = units["block_dense_max"] + units["block_expert_max"] / layout.ep
        mem["fsdp_buffers"] = (2 * a + 4) * block + a * units["root"]
    mem["overhead"] = cluster.overhead_gib * GIB
    return mem


def plan_layout(cfg: ModelConfig, shape: TrainingShape, layout: Layout, cluster: ClusterSpec) -> Plan:
    """Memory, communication and time of one layout (raises ValueError when the layout is impossible)."""
    ParallelDims(
        world_size=layout.world_size,
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        cp=layout.cp,
        ep=layout.ep,
        num_experts=cfg.moe.num_experts if cfg.num_moe_layers else None,
    )
    if layout.cp > 1 and shape.seq_len % (2 * layout.cp):
        raise ValueError(f"seq_len={shape.seq_len} must be divisible by 2*cp = {2 * layout.cp} (zigzag CP)")
    M = micro_batches_per_step(shape, layout)
    mem = memory_per_rank(cfg, shape, layout, cluster)
    T = shape.micro_batch * shape.seq_len / layout.cp
    return Plan(
        layout=layout,
        micro_batches=M,
        memory=mem,
        comm=comm_per_step(cfg, shape, layout, cluster),
        compute_s=compute_seconds(cfg, shape, layout, cluster),
        fits=sum(mem.values()) <= cluster.memory_gib * GIB,
        a2a_rows_per_layer=a2a_rows(cfg, T, layout.ep),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(world_size: int, *, max_cp: int = 8) -> list[Layout]:
    """Every (dp_replicate, dp_shard, cp, ep) with product dp_replicate*dp_shard*cp = world and ep | dp_shard*cp."""
    out = []
    for R in _divisors(world_size):
        for cp in _divisors(world_size // R):
            if cp > max_cp:
                continue
            dp_shard = world_size // (R * cp)
            out.extend(Layout(R, dp_shard, cp, ep) for ep in _divisors(dp_shard * cp))
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
    sort_by: str = "step",
) -> tuple[list[Plan], list[tuple[Layout, str]]]:
    """Plans for every valid layout (fitting ones first, then by `sort_by`), and the rejected layouts with why."""
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by={sort_by!r} is not one of {list(SORT_KEYS)}")
    layouts = candidate_layouts(cluster.world_size, max_cp=max_cp) if layouts is None else layouts
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
    optimizer state, activations, FSDP buffers, total; fit); communication per optimizer step in GB (expert
    all-to-all, FSDP/data-parallel, CP K/V) and time per step in seconds (communication, compute, their sum)."""
    segments = [
        f"{'rep':>4} {'shard':>5} {'cp':>3} {'ep':>3} {'eps':>4} {'mb':>4} ",
        f" {'param':>7} {'grad':>7} {'optim':>7} {'act':>7} {'fsdp':>6} {'total':>7} fit ",
        f" {'a2a':>8} {'fsdp':>8} {'cp':>7} ",
        f" {'comm':>7} {'comp':>7} {'step':>7}",
    ]
    titles = ["degrees; mb: micro-batches", "memory per rank, GiB", "comm per step, GB", "time per step, s"]
    groups = "|".join(f" {t:<{len(seg) - 1}}" for t, seg in zip(titles, segments)).rstrip()
    head = "|".join(segments)
    lines = [groups, head, "-" * len(head)]
    for p in plans:
        L, m, c = p.layout, {k: v / GIB for k, v in p.memory.items()}, p.comm
        fsdp_gb = sum(v["bytes"] for k, v in c.items() if k not in ("expert_a2a", "cp_kv_allgather")) / 1e9
        lines.append(
            f"{L.dp_replicate:>4} {L.dp_shard:>5} {L.cp:>3} {L.ep:>3} {L.ep_shard:>4} {p.micro_batches:>4} | "
            f"{m['params']:>7.2f} {m['grads']:>7.2f} {m['optimizer']:>7.2f} {m['activations']:>7.2f} "
            f"{m.get('fsdp_buffers', 0.0):>6.2f} {p.memory_total / GIB:>7.2f} {'yes' if p.fits else ' NO'} | "
            f"{c.get('expert_a2a', {}).get('bytes', 0) / 1e9:>8.2f} {fsdp_gb:>8.2f} "
            f"{c.get('cp_kv_allgather', {}).get('bytes', 0) / 1e9:>7.2f} | {p.comm_s:>7.3f} {p.compute_s:>7.3f} "
            f"{p.step_s:>7.3f}"
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

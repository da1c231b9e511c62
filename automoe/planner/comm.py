"""Planner communication model: expected all-to-all pairs and bytes/time of every collective per step."""

from __future__ import annotations

import math

from automoe.config.model import ModelConfig
from automoe.planner.inputs import DTYPE_BYTES, ClusterSpec, TrainingShape
from automoe.planner.memory import (
    Layout,
    Stage,
    expected_distinct_ranks,
    fsdp_unit_numel,
    is_tp_param,
    kv_width,
    param_inventory,
    shard_numel,
    tp_local_shape,
    tp_shard_dim,
    whole_model,
)


# ---------------------------------------------------------------------------------------------------------------
# Communication per optimizer step (bytes each rank receives; ring collectives; time from the slowest link)
# ---------------------------------------------------------------------------------------------------------------
def _groups(layout: Layout) -> dict[str, list[int]]:
    """The groups containing rank 0 on the row-major meshes of `ParallelDims`: dense (pp, dp_replicate,
    dp_shard, cp, tp), expert (pp, dp_replicate, ep_shard, ep)."""
    nd, R, tp = layout.dp_shard * layout.cp, layout.dp_replicate, layout.tp
    return {
        "dense_shard": [i * tp for i in range(nd)],
        "replicate": [i * nd * tp for i in range(R)],
        "cp": [i * tp for i in range(layout.cp)],
        "tp": list(range(tp)),
        "ep": list(range(layout.ep)),
        "ep_shard": [i * layout.ep for i in range(layout.ep_shard)],
        "expert_data": [i * layout.ep for i in range(R * layout.ep_shard)],
        "stage": list(range(layout.stage_size)),
        "pp": [i * layout.stage_size for i in range(layout.pp)],
    }


def _ring_seconds(num_bytes: float, group: list[int], cluster: ClusterSpec) -> float:
    """A ring collective runs at the slowest link it crosses: inter-node when the group spans nodes."""
    spans = len({r // cluster.gpus_per_node for r in group}) > 1
    return num_bytes / (1e9 * (cluster.inter_node_gbps if spans else cluster.intra_node_gbps))


def _a2a_seconds(num_bytes: float, group: list[int], cluster: ClusterSpec) -> float:
    """Equal bytes to every peer; same-node and off-node peers are served in parallel by different links."""
    peers = len(group) - 1
    if peers == 0:
        return 0.0
    same_node = sum(1 for r in group if r // cluster.gpus_per_node == 0) - 1
    per_peer = num_bytes / peers
    intra = same_node * per_peer / (1e9 * cluster.intra_node_gbps)
    inter = (peers - same_node) * per_peer / (1e9 * cluster.inter_node_gbps)
    return max(intra, inter)


def micro_batches_per_step(shape: TrainingShape, layout: Layout) -> int:
    per_step = shape.micro_batch * layout.data_parallel
    if shape.global_batch % per_step:
        raise ValueError(
            f"global_batch={shape.global_batch} is not divisible by micro_batch*dp_replicate*dp_shard = "
            f"{shape.micro_batch}*{layout.dp_replicate}*{layout.dp_shard} = {per_step}"
        )
    return shape.global_batch // per_step


def a2a_rows(cfg: ModelConfig, tokens: float, ep: int) -> dict[str, float]:
    """Expected rows one rank sends per MoE layer forward for `tokens` local tokens under uniform routing.

    `sent` counts every (token, destination rank) pair (the dispatcher's WireStats.rows_sent, self included);
    `remote` the pairs that leave the rank (a token's pairs are spread evenly over the ep ranks by symmetry).
    """
    if ep == 1:
        return {"sent": 0.0, "remote": 0.0}
    u = expected_distinct_ranks(cfg.moe.num_experts, cfg.moe.num_activated_experts, ep)
    return {"sent": tokens * u, "remote": tokens * u * (ep - 1) / ep}


def a2a_bytes_per_pair(cfg: ModelConfig, a: int) -> dict[str, int]:
    """Bytes per remote (token, rank) pair. Forward: token row (a*D), K local expert ids (int64), K routing
    weights (compute dtype) and the returned row (a*D). Backward: the returned row's gradient, the token row's
    gradient (a*D each) and the K weight gradients. Expert ids travel without autograd."""
    D, K = cfg.dim, cfg.moe.num_activated_experts
    return {"forward": 2 * a * D + K * (8 + a), "backward": 2 * a * D + K * a}


def tp_message_width(cfg: ModelConfig, *, activation_checkpointing: str, stage: Stage) -> int:
    """Numbers per token one tp rank all-gathers or reduce-scatters per micro-batch (`apply_tp`: Megatron TP +
    sequence parallel): a multiple of D plus, on the last stage, the vocabulary.

    Attention and every dense MLP: all-gather of the (sequence-sharded) input and reduce-scatter of the
    row-parallel output in forward, the reverse pair in backward (4 D; 6 D with full AC, whose recompute repeats
    the forward pair). The MoE layer runs on the tp rank's slice of the sequence: none. Embedding (vocab-parallel,
    output reduce-scattered to sequence shards): 2 D. Head: its input all-gathered (and its gradient
    reduce-scattered back), 2 D, and its logits all-gathered over the vocabulary (V; the gradient of replicated
    logits is sliced locally).
    """
    per_block = 6 if activation_checkpointing == "full" else 4
    dense_mlps = sum(1 for i in stage.blocks if not cfg.is_moe_layer(i))
    messages = per_block * (len(stage.blocks) + dense_mlps) + 2 * stage.first + 2 * stage.last
    return messages * cfg.dim + (cfg.vocab_size if stage.last else 0)


def tp_norm_numel(cfg: ModelConfig, stage: Stage) -> int:
    """Elements of the sequence-parallel norms' weights (replicated DTensors on tp): their partial gradients are
    all-reduced over tp in every backward."""
    return sum(
        math.prod(s.shape)
        for s in param_inventory(cfg)
        if stage.holds(s) and is_tp_param(s) and tp_shard_dim(s) is None
    )


def comm_per_step(
    cfg: ModelConfig,
    shape: TrainingShape,
    layout: Layout,
    cluster: ClusterSpec,
    *,
    stage: Stage | None = None,
) -> dict[str, dict[str, float]]:
    """{collective: {"bytes", "seconds"}} per optimizer step for the first rank of `stage` (default: the whole
    model; bytes that cross the wire)."""
    stage = whole_model(cfg) if stage is None else stage
    a, ac = DTYPE_BYTES[shape.compute_dtype], int(shape.activation_checkpointing == "full")
    moe_ac = int(shape.activation_checkpointing in ("full", "moe"))  # the MoE forward runs again in backward
    M = micro_batches_per_step(shape, layout)
    T = shape.micro_batch * shape.seq_len / layout.cp
    tp = layout.tp
    num_moe = sum(1 for i in stage.blocks if cfg.is_moe_layer(i))
    groups, out = _groups(layout), {}
    if layout.ep > 1 and num_moe:  # forward runs again in the recompute under full or MoE AC
        pair = a2a_bytes_per_pair(cfg, a)
        remote = a2a_rows(cfg, T / tp, layout.ep)["remote"]  # each tp rank routes 1/tp of the sequence
        counts = (layout.ep - 1) * 8 * (2 + moe_ac)
        total = num_moe * M * (remote * ((1 + moe_ac) * pair["forward"] + pair["backward"]) + counts)
        out["expert_a2a"] = {"bytes": total, "seconds": _a2a_seconds(total, groups["ep"], cluster)}
    if layout.cp > 1:  # K/V (+ int64 positions) gathered per attention; backward reduce-scatters K/V grads
        width = kv_width(cfg, tp=tp)
        fwd, bwd = (layout.cp - 1) * T * (a * width + 8), (layout.cp - 1) * T * a * width
        total = len(stage.blocks) * M * ((1 + ac) * fwd + bwd)
        out["cp_kv_allgather"] = {"bytes": total, "seconds": _ring_seconds(total, groups["cp"], cluster)}
    if tp > 1:  # ring all-gather / reduce-scatter of [T, width]: (tp - 1)/tp of it crosses the wire
        width = tp_message_width(cfg, activation_checkpointing=shape.activation_checkpointing, stage=stage)
        total = M * (tp - 1) / tp * T * width * a
        out["tp_activations"] = {"bytes": total, "seconds": _ring_seconds(total, groups["tp"], cluster)}
        grads = M * 2 * (tp - 1) / tp * a * tp_norm_numel(cfg, stage)
        out["tp_grad_allreduce"] = {"bytes": grads, "seconds": _ring_seconds(grads, groups["tp"], cluster)}
    out.update(_data_parallel_comm(cfg, shape, layout, cluster, M, groups, stage))
    return out


def _data_parallel_comm(cfg, shape, layout, cluster, M, groups, stage) -> dict[str, dict[str, float]]:
    """FSDP2: all-gather each block in forward and again in backward (the root once: it is not resharded),
    reduce-scatter fp32 gradients every micro-batch, HSDP all-reduce of the shards over replicas. Without FSDP:
    one all-reduce per step of dense grads over the stage's data ranks and of expert grads over the expert-data
    ranks. Dense sizes are a tp rank's (its part of the TP-sharded tensors)."""
    a, units = DTYPE_BYTES[shape.compute_dtype], fsdp_unit_numel(cfg, tp=layout.tp, stage=stage)
    nd, es, R = layout.dp_shard * layout.cp, layout.ep_shard, layout.dp_replicate
    dense = units["blocks_dense_total"] + units["root"]
    # FSDP2 pads dim 0 to a multiple of the shard count: E/ep = 1 expert over es ranks moves es padded rows
    expert_local = sum(
        shard_numel((s.shape[0] // layout.ep, *s.shape[1:]), es, 0) * es
        for s in param_inventory(cfg)
        if s.expert and stage.holds(s)
    )
    out = {}

    def add(name: str, num_bytes: float, group: list[int]) -> None:
        if num_bytes > 0:
            out[name] = {"bytes": num_bytes, "seconds": _ring_seconds(num_bytes, group, cluster)}

    if not shape.fsdp:
        W, tp = R * nd, layout.tp  # W: the stage's ranks holding the same tp shard
        if tp == 1:
            add("dense_allreduce", 2 * (W - 1) / W * 4 * dense, groups["stage"])
        else:  # tp DTensors over the tp shard's replicas; the MoE layer's plain tensors over the whole stage
            specs = [s for s in param_inventory(cfg) if stage.holds(s) and not s.expert]
            sharded = sum(math.prod(tp_local_shape(s, tp)) for s in specs if is_tp_param(s))
            plain = sum(math.prod(s.shape) for s in specs if not is_tp_param(s))
            add("dense_allreduce", 2 * (W - 1) / W * 4 * sharded, groups["stage"][::tp])
            add("moe_dense_allreduce", 2 * (W * tp - 1) / (W * tp) * 4 * plain, groups["stage"])
        G = R * es
        add("expert_allreduce", 2 * (G - 1) / G * 4 * expert_local, groups["expert_data"])
        return out
    # a block's dense part is gathered in forward and again in backward; under pp it is an FSDP root of its own,
    # which FSDP2 keeps gathered from forward to backward: once per micro-batch
    gathered = (1 if layout.pp > 1 else 2) * units["blocks_dense_total"] + units["root"]
    add("fsdp_allgather", M * (nd - 1) / nd * a * gathered, groups["dense_shard"])
    add("fsdp_reduce_scatter", M * (nd - 1) / nd * 4 * dense, groups["dense_shard"])
    add("expert_allgather", M * (es - 1) / es * a * 2 * expert_local, groups["ep_shard"])
    add("expert_reduce_scatter", M * (es - 1) / es * 4 * expert_local, groups["ep_shard"])
    shard = dense / nd + expert_local / es
    add("hsdp_allreduce", M * 2 * (R - 1) / R * 4 * shard, groups["replicate"])
    return out

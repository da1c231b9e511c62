"""Layout planner: per-rank memory and per-step communication of (dp_replicate, dp_shard, cp, ep) layouts.

Pure arithmetic over a model config, a training shape and a cluster description; nothing is allocated (the model
is built on the meta device to read parameter shapes) and no process group is touched. Formulas: docs/planning.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.models import Transformer, num_params
from automoe.parallel.dims import ParallelDims

REPO = Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
AC_MODES = ("none", "full")
GIB = 2**30
OPTIMIZER_STATE_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32, per parameter element
STEP_BYTES = 4  # AdamW's fp32 `step` scalar, one per parameter tensor


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingShape:
    """What one optimizer step processes, and the numerics that size activations and messages."""

    global_batch: int  # sequences per optimizer step (over all data-parallel ranks and micro-batches)
    micro_batch: int = 1  # sequences per rank per forward/backward
    seq_len: int = 4096  # tokens per sequence (split over cp ranks)
    param_dtype: str = "float32"  # master parameters and gradients
    compute_dtype: str = (
        "bfloat16"  # activations, FSDP all-gathers and all-to-all rows (FSDP reduces in fp32)
    )
    activation_checkpointing: str = "none"  # none | full (every block recomputed in backward)
    fsdp: bool = (
        True  # FSDP2 on dense (dp_shard*cp) and expert (ep_shard) axes; False = replicate + all-reduce
    )
    routing_imbalance: float = (
        1.0  # max/mean expert-slot load per rank: scales routed activations (1 = uniform)
    )

    def __post_init__(self) -> None:
        for name in ("global_batch", "micro_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingShape.{name}={getattr(self, name)} must be >= 1")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(
                    f"TrainingShape.{name}={getattr(self, name)!r} is not one of {list(DTYPE_BYTES)}"
                )
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"TrainingShape.activation_checkpointing={self.activation_checkpointing!r} is not one of "
                f"{list(AC_MODES)}"
            )
        if self.routing_imbalance < 1.0:
            raise ValueError(f"TrainingShape.routing_imbalance={self.routing_imbalance} must be >= 1")


@dataclass
class ClusterSpec:
    """The machines: identical nodes of identical accelerators (bandwidths are per accelerator, one direction)."""

    name: str = "custom"  # label printed in reports
    gpus_per_node: int = 8  # accelerators (ranks) per node
    num_nodes: int = 1  # nodes; world = gpus_per_node * num_nodes
    memory_gib: float = 80.0  # memory per accelerator, GiB
    intra_node_gbps: float = 450.0  # GB/s per rank to peers in the same node (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per rank to other nodes (one 400 Gb/s NIC per GPU)
    peak_tflops: float = 989.0  # dense matmul peak per rank in the compute dtype, TFLOP/s
    mfu: float = 0.4  # fraction of peak the model's matmuls reach (compute-time estimate only)
    overhead_gib: float = 4.0  # fixed per-rank memory: runtime context, allocator fragmentation, workspaces

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClusterSpec.{name}={getattr(self, name)} must be >= 1")
        for name in ("memory_gib", "intra_node_gbps", "inter_node_gbps", "peak_tflops", "mfu"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClusterSpec.{name}={getattr(self, name)} must be > 0")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes


def load_model_config(name_or_path: str) -> ModelConfig:
    """A preset from configs/model (`tiny`, `mixtral_8x7b`, ...) or a YAML path, merged over the typed schema."""
    path = Path(name_or_path)
    if not path.suffix:
        path = REPO / "configs" / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"model={name_or_path!r}: no such preset or file ({path})")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def load_cluster(name_or_path: str | None = None, **overrides) -> ClusterSpec:
    """A cluster from configs/cluster (`h100x8`, `cpu2`) or a YAML path, then non-None keyword overrides."""
    values = {}
    if name_or_path is not None:
        path = Path(name_or_path)
        if not path.suffix:
            path = REPO / "configs" / "cluster" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"cluster={name_or_path!r}: no such preset or file ({path})")
        values = OmegaConf.to_container(
            OmegaConf.merge(OmegaConf.structured(ClusterSpec), OmegaConf.load(path))
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterSpec(**values)


# ---------------------------------------------------------------------------------------------------------------
# Parameters: shapes read from a meta-device model, sharded with torch.chunk semantics (what FSDP2/DTensor do)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    expert: bool  # a routed-expert weight (sharded over ep, then ep_shard)
    block: int | None  # transformer block index; None for the root (embeddings, final norm, output head)


@lru_cache(maxsize=8)
def _inventory(cfg_key: str) -> tuple[ParamSpec, ...]:
    cfg = _CFG_BY_KEY[cfg_key]
    with torch.device("meta"):
        model = Transformer(cfg)
    specs, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        block = int(parts[1]) if parts[0] == "layers" else None
        specs.append(ParamSpec(name, tuple(p.shape), ".moe.experts." in name, block))
    return tuple(specs)


_CFG_BY_KEY: dict[str, ModelConfig] = {}


@lru_cache(maxsize=8)
def _param_counts(cfg_key: str):
    return num_params(_CFG_BY_KEY[cfg_key])


def param_counts(cfg: ModelConfig):
    """`automoe.models.num_params(cfg)` (total and active), cached per config."""
    key = repr(cfg)
    _CFG_BY_KEY[key] = cfg
    return _param_counts(key)


def param_inventory(cfg: ModelConfig) -> tuple[ParamSpec, ...]:
    """Every parameter (tied ones once) with its global shape and whether it is a routed-expert weight."""
    key = repr(cfg)
    _CFG_BY_KEY[key] = cfg
    return _inventory(key)


def shard_numel(shape: tuple[int, ...], num_shards: int, index: int) -> int:
    """Elements of shard `index` when dim 0 is split like `torch.chunk` (ceil-sized chunks, the last ones short)."""
    if not shape:
        return 1 if index == 0 else 0
    rows = math.ceil(shape[0] / num_shards)
    local_rows = max(0, min(rows, shape[0] - index * rows))
    return local_rows * math.prod(shape[1:])


@dataclass(frozen=True)
class Layout:
    """One candidate layout; `ParallelDims` is the judge of validity."""

    dp_replicate: int
    dp_shard: int
    cp: int
    ep: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def ep_shard(self) -> int:
        return self.dp_shard * self.cp // self.ep

    @property
    def data_parallel(self) -> int:
        return self.dp_replicate * self.dp_shard

    def name(self) -> str:
        return f"rep{self.dp_replicate}-shard{self.dp_shard}-cp{self.cp}-ep{self.ep}"


def local_param_numel(
    cfg: ModelConfig, layout: Layout, *, rank: int = 0, fsdp: bool = True
) -> dict[str, int]:
    """Parameter elements held by `rank`: dense ones sharded over dp_shard*cp (FSDP), experts over ep x ep_shard.

    Rank coordinates follow the row-major meshes of `ParallelDims`: dense (dp_replicate, dp_shard*cp) and
    expert (dp_replicate, ep_shard, ep). Returns {"dense", "expert", "tensors"} (tensors = local parameter count).
    """
    dense_shards = layout.dp_shard * layout.cp if fsdp else 1
    dense_index = rank % (layout.dp_shard * layout.cp) if fsdp else 0
    ep_shard_index = (rank // layout.ep) % layout.ep_shard
    out = {"dense": 0, "expert": 0, "tensors": 0}
    for spec in param_inventory(cfg):
        if spec.expert:
            ep_local = (spec.shape[0] // layout.ep, *spec.shape[1:])
            if fsdp and ep_local[0] < layout.ep_shard and len(ep_local) > 1:
                # fewer local experts than expert-data ranks: FSDP shards dim 1 (automoe.parallel.fsdp)
                ep_local = (ep_local[1], ep_local[0], *ep_local[2:])
            n = shard_numel(ep_local, layout.ep_shard, ep_shard_index) if fsdp else math.prod(ep_local)
            out["expert"] += n
        else:
            out["dense"] += shard_numel(spec.shape, dense_shards, dense_index)
        out["tensors"] += 1
    return out


def state_bytes(cfg: ModelConfig, shape: TrainingShape, layout: Layout, *, rank: int = 0) -> dict[str, int]:
    """Parameter, gradient and AdamW-state bytes on `rank` (gradients in the parameter dtype, states fp32)."""
    numel = local_param_numel(cfg, layout, rank=rank, fsdp=shape.fsdp)
    elems = numel["dense"] + numel["expert"]
    p = DTYPE_BYTES[shape.param_dtype]
    return {
        "params": elems * p,
        "grads": elems * p,
        "optimizer": elems * OPTIMIZER_STATE_BYTES + numel["tensors"] * STEP_BYTES,
    }


def fsdp_unit_numel(cfg: ModelConfig) -> dict[str, int]:
    """Global elements per FSDP unit: the largest block's dense part, its experts, and the root."""
    dense: dict[int | None, int] = {}
    expert: dict[int | None, int] = {}
    for spec in param_inventory(cfg):
        bucket = expert if spec.expert else dense
        bucket[spec.block] = bucket.get(spec.block, 0) + math.prod(spec.shape)
    blocks = [b for b in dense if b is not None]
    return {
        "root": dense.get(None, 0),
        "block_dense_max": max(dense[b] for b in blocks),
        "block_expert_max": max(expert.values(), default=0),
        "blocks_dense_total": sum(dense[b] for b in blocks),
        "expert_total": sum(expert.values()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Routing: expected distinct destination ranks per token
# ---------------------------------------------------------------------------------------------------------------
def expected_distinct_ranks(num_experts: int, top_k: int, num_ranks: int) -> float:
    """E[#ranks hit] when a token picks `top_k` distinct experts uniformly from `num_experts`, E/P per rank.

    A given rank owns n = E/P experts and is missed only if all K picks fall among the other E - n:
    P(miss) = C(E-n, K) / C(E, K). By linearity, E[ranks hit] = P * (1 - C(E-n, K) / C(E, K)).
    """
    if num_experts % num_ranks:
        raise ValueError(f"num_experts % ep = {num_experts} % {num_ranks} != 0")
    n = num_experts // num_ranks
    miss = math.comb(num_experts - n, top_k) / math.comb(num_experts, top_k)
    return num_ranks * (1.0 - miss)


# ---------------------------------------------------------------------------------------------------------------
# Activations (bytes saved for backward, per token, one micro-batch in flight)
# ---------------------------------------------------------------------------------------------------------------
def attention_bytes_per_token(cfg: ModelConfig, a: int) -> int:
    """Tensors the attention sub-block saves for backward, per local token (a = compute dtype bytes).

    GQA: norm input + output (2D), q and k before and after RoPE, v (2q + 3kv), the SDPA output and its
    contiguous copy into o_proj (2q), plus the fp32 log-sum-exp per head (flash-style kernels: no S x S matrix).
    MLA: the same idea over its latent tensors (q_lora, kv_lora, rope key) and the expanded per-head q/k/v.
    """
    D, H = cfg.dim, cfg.num_heads
    if cfg.attention == "mla":
        N, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        ql = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0
        elems = (
            2 * D + ql + H * (N + R) + (C + R) + 2 * C + H * (N + V) + 2 * H * (N + R) + H * R + R + 2 * H * V
        )
        return a * elems + 4 * H
    q, kv = H * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    elems = 2 * D + 4 * q + 3 * kv + (q + kv if cfg.qk_norm else 0)
    return a * elems + 4 * H


def ffn_bytes_per_token(cfg: ModelConfig, layer_id: int, a: int, *, imbalance: float = 1.0) -> float:
    """The FFN sub-block: norm input/output (2D) plus a dense SwiGLU (4F) or the MoE layer.

    MoE, per token: router in fp32 (input cast when a != 4, logits and scores 2E), top-k ids (int64) and weights;
    the K-fold expansion of expert inputs: K slots x (input row D, up output H = 2F gated or F, activation
    output F, expert output D before weighting), times `imbalance` on the busiest rank; shared experts 4 x F_s.
    """
    D = cfg.dim
    base = a * 2 * D
    if not cfg.is_moe_layer(layer_id):
        return base + a * 4 * cfg.ffn_inter_dim
    moe = cfg.moe
    E, K, F = moe.num_experts, moe.num_activated_experts, moe.moe_inter_dim
    router = 4 * (D if a != 4 else 0) + 4 * 2 * E + K * (8 + a)
    hidden = 3 * F if moe.gated else 2 * F
    routed = imbalance * K * a * (2 * D + hidden)
    shared = a * 4 * moe.shared_inter_dim
    return base + router + routed + shared


def activation_bytes(cfg: ModelConfig, shape: TrainingShape, layout: Layout) -> dict[str, float]:
    """Peak bytes saved for backward on one rank for one micro-batch (micro-batches run one after another).

    T = micro_batch * seq_len / cp local tokens. No AC: every block's saved tensors, T * sum_l bytes_l.
    Full AC: only each block's input (T * D) plus one block recomputed during its backward (T * max_l bytes_l).
    Context parallel adds the gathered K/V of the other cp-1 ranks and a bool visibility mask per layer.
    The head holds the logits (a) and CE's fp32 log-softmax (4) over the vocabulary.
    """
    a = DTYPE_BYTES[shape.compute_dtype]
    T = shape.micro_batch * shape.seq_len / layout.cp
    per_layer = []
    for i in range(cfg.num_layers):
        layer = attention_bytes_per_token(cfg, a) + ffn_bytes_per_token(
            cfg, i, a, imbalance=shape.routing_imbalance
        )
        per_layer.append(T * layer + _cp_extra_bytes(cfg, shape, layout, a))
    if shape.activation_checkpointing == "full":
        blocks = cfg.num_layers * T * a * cfg.dim + max(per_layer)
    else:
        blocks = sum(per_layer)
    head = T * (a * 2 * cfg.dim + (a + 4) * cfg.vocab_size)
    return {"blocks": blocks, "head": head}


def _kv_width(cfg: ModelConfig) -> int:
    """Numbers per token the CP K/V gather moves (MLA gathers its compressed latent and shared RoPE key)."""
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.num_kv_heads * cfg.head_dim


def _cp_extra_bytes(cfg: ModelConfig, shape: TrainingShape, layout: Layout, a: int) -> float:
    if layout.cp == 1:
        return 0.0
    local = shape.micro_batch * shape.seq_len / layout.cp
    gathered = (layout.cp - 1) * local * (a * _kv_width(cfg) + 8)
    mask = local * shape.seq_len  # bool [B, S/cp, S]: one byte per (query, key)
    return gathered + mask


# ---------------------------------------------------------------------------------------------------------------
# Communication per optimizer step (bytes each rank receives; ring collectives; time from the slowest link)
# ---------------------------------------------------------------------------------------------------------------
def _groups(layout: Layout) -> dict[str, list[int]]:
    """The groups containing rank 0 on the row-major meshes of `ParallelDims`."""
    nd, R = layout.dp_shard * layout.cp, layout.dp_replicate
    return {
        "dense_shard": list(range(nd)),
        "replicate": [i * nd for i in range(R)],
        "cp": list(range(layout.cp)),
        "ep": list(range(layout.ep)),
        "ep_shard": [i * layout.ep for i in range(layout.ep_shard)],
        "expert_data": [i * layout.ep for i in range(R * layout.ep_shard)],
        "world": list(range(layout.world_size)),
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


def comm_per_step(
    cfg: ModelConfig, shape: TrainingShape, layout: Layout, cluster: ClusterSpec
) -> dict[str, dict[str, float]]:
    """{collective: {"bytes", "seconds"}} per optimizer step for rank 0 (bytes that cross the wire)."""
    a, ac = DTYPE_BYTES[shape.compute_dtype], int(shape.activation_checkpointing == "full")
    M = micro_batches_per_step(shape, layout)
    T = shape.micro_batch * shape.seq_len / layout.cp
    groups, out = _groups(layout), {}
    if layout.ep > 1:  # forward runs again in the recompute under full AC
        pair = a2a_bytes_per_pair(cfg, a)
        remote = a2a_rows(cfg, T, layout.ep)["remote"]
        counts = (layout.ep - 1) * 8 * (2 + ac)
        total = cfg.num_moe_layers * M * (remote * ((1 + ac) * pair["forward"] + pair["backward"]) + counts)
        out["expert_a2a"] = {"bytes": total, "seconds": _a2a_seconds(total, groups["ep"], cluster)}
    if layout.cp > 1:  # K/V (+ int64 positions) gathered per attention; backward reduce-scatters K/V grads
        fwd, bwd = (layout.cp - 1) * T * (a * _kv_width(cfg) + 8), (layout.cp - 1) * T * a * _kv_width(cfg)
        total = cfg.num_layers * M * ((1 + ac) * fwd + bwd)
        out["cp_kv_allgather"] = {"bytes": total, "seconds": _ring_seconds(total, groups["cp"], cluster)}
    out.update(_data_parallel_comm(cfg, shape, layout, cluster, M, groups))
    return out


def _data_parallel_comm(cfg, shape, layout, cluster, M, groups) -> dict[str, dict[str, float]]:
    """FSDP2: all-gather each block in forward and again in backward (the root once: it is not resharded),
    reduce-scatter fp32 gradients every micro-batch, HSDP all-reduce of the shards over replicas. Without FSDP:
    one all-reduce per step of dense grads over every rank and of expert grads over the expert-data ranks."""
    a, units = DTYPE_BYTES[shape.compute_dtype], fsdp_unit_numel(cfg)
    nd, es, R = layout.dp_shard * layout.cp, layout.ep_shard, layout.dp_replicate
    dense = units["blocks_dense_total"] + units["root"]
    # FSDP2 pads dim 0 to a multiple of the shard count: E/ep = 1 expert over es ranks moves es padded rows
    expert_local = sum(
        shard_numel((s.shape[0] // layout.ep, *s.shape[1:]), es, 0) * es
        for s in param_inventory(cfg)
        if s.expert
    )
    out = {}

    def add(name: str, num_bytes: float, group: list[int]) -> None:
        if num_bytes > 0:
            out[name] = {"bytes": num_bytes, "seconds": _ring_seconds(num_bytes, group, cluster)}

    if not shape.fsdp:
        W = layout.world_size
        add("dense_allreduce", 2 * (W - 1) / W * 4 * dense, groups["world"])
        G = R * es
        add("expert_allreduce", 2 * (G - 1) / G * 4 * expert_local, groups["expert_data"])
        return out
    gathered = 2 * units["blocks_dense_total"] + units["root"]
    add("fsdp_allgather", M * (nd - 1) / nd * a * gathered, groups["dense_shard"])
    add("fsdp_reduce_scatter", M * (nd - 1) / nd * 4 * dense, groups["dense_shard"])
    add("expert_allgather", M * (es - 1) / es * a * 2 * expert_local, groups["ep_shard"])
    add("expert_reduce_scatter", M * (es - 1) / es * 4 * expert_local, groups["ep_shard"])
    shard = dense / nd + expert_local / es
    add("hsdp_allreduce", M * 2 * (R - 1) / R * 4 * shard, groups["replicate"])
    return out


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
    token, plus causal attention (3 or 4 passes of 2 * (S/2) * H * (d_qk + d_v) per token and layer)."""
    counts = param_counts(cfg)
    matmul = counts.active - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    passes = 4 if shape.activation_checkpointing == "full" else 3
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    attn = passes * 2 * (shape.seq_len / 2) * cfg.num_heads * (d_qk + d_v) * cfg.num_layers
    per_token = 2 * passes * matmul + attn
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
    """One line per plan: degrees, memory in GiB (state / activations / total), comm GB and seconds per step."""
    head = (
        f"{'rep':>4} {'shard':>5} {'cp':>3} {'ep':>3} {'eps':>4} {'mb':>4} | {'param':>7} {'grad':>7} "
        f"{'optim':>7} {'act':>7} {'fsdp':>6} {'total':>7} fit | {'a2a GB':>8} {'fsdp GB':>8} {'cp GB':>7} "
        f"{'comm s':>7} {'comp s':>7} {'step s':>7}"
    )
    lines = [head, "-" * len(head)]
    for p in plans:
        L, m, c = p.layout, {k: v / GIB for k, v in p.memory.items()}, p.comm
        fsdp_gb = sum(v["bytes"] for k, v in c.items() if k not in ("expert_a2a", "cp_kv_allgather")) / 1e9
        lines.append(
            f"{L.dp_replicate:>4} {L.dp_shard:>5} {L.cp:>3} {L.ep:>3} {L.ep_shard:>4} {p.micro_batches:>4} | "
            f"{m['params']:>7.2f} {m['grads']:>7.2f} {m['optimizer']:>7.2f} {m['activations']:>7.2f} "
            f"{m.get('fsdp_buffers', 0.0):>6.2f} {p.memory_total / GIB:>7.2f} {'yes' if p.fits else ' NO'} | "
            f"{c.get('expert_a2a', {}).get('bytes', 0) / 1e9:>8.2f} {fsdp_gb:>8.2f} "
            f"{c.get('cp_kv_allgather', {}).get('bytes', 0) / 1e9:>7.2f} {p.comm_s:>7.3f} {p.compute_s:>7.3f} "
            f"{p.step_s:>7.3f}"
        )
    return "\n".join(lines)

"""Planner memory model: parameter shapes from a meta-device model, per-rank sharding (FSDP, EP, TP; one pipeline
stage's pieces), activations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from automoe.config.model import ModelConfig
from automoe.models import Transformer, num_params
from automoe.planner.inputs import DTYPE_BYTES, OPTIMIZER_STATE_BYTES, STEP_BYTES, TrainingShape


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


def moe_active_numel(cfg: ModelConfig) -> float:
    """Parameters of the MoE layers one token uses: routers, shared experts, K/E of the routed experts."""
    share = cfg.moe.num_activated_experts / cfg.moe.num_experts if cfg.num_moe_layers else 0.0
    return sum(
        math.prod(s.shape) * (share if s.expert else 1) for s in param_inventory(cfg) if ".moe." in s.name
    )


def shard_numel(shape: tuple[int, ...], num_shards: int, index: int) -> int:
    """Elements of shard `index` when dim 0 is split like `torch.chunk` (ceil-sized chunks, the last ones short)."""
    if not shape:
        return 1 if index == 0 else 0
    rows = math.ceil(shape[0] / num_shards)
    local_rows = max(0, min(rows, shape[0] - index * rows))
    return local_rows * math.prod(shape[1:])


def chunk_len(n: int, num_chunks: int, index: int) -> int:
    """Length of chunk `index` when `n` is split like `torch.chunk` (ceil-sized chunks, the last ones short)."""
    size = math.ceil(n / num_chunks)
    return max(0, min(size, n - index * size))


@dataclass(frozen=True)
class Layout:
    """One candidate layout; `ParallelDims` is the judge of validity. Row-major over ranks like its meshes:
    dense (pp, dp_replicate, dp_shard, cp, tp), expert (pp, dp_replicate, ep_shard, ep), so a tp group is `tp`
    consecutive ranks and a pipeline stage `world / pp` consecutive ranks."""

    dp_replicate: int
    dp_shard: int
    cp: int
    ep: int
    pp: int = 1  # pipeline stages (outermost axis)
    tp: int = 1  # tensor-parallel ranks (innermost axis; sequence parallel outside attention and dense MLP)

    @property
    def world_size(self) -> int:
        return self.pp * self.stage_size

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage."""
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def ep_shard(self) -> int:
        """EP borrows its ranks from dp_shard x cp x tp; the rest shard each expert with FSDP."""
        return self.dp_shard * self.cp * self.tp // self.ep

    @property
    def data_parallel(self) -> int:
        return self.dp_replicate * self.dp_shard

    def name(self) -> str:
        pp = f"pp{self.pp}-" if self.pp > 1 else ""
        tp = f"-tp{self.tp}" if self.tp > 1 else ""
        return f"{pp}rep{self.dp_replicate}-shard{self.dp_shard}-cp{self.cp}-ep{self.ep}{tp}"


@dataclass(frozen=True)
class Stage:
    """The pieces of the model one rank holds: its blocks, and the embedding (first) / norm + head (last)."""

    blocks: tuple[int, ...]
    first: bool = True
    last: bool = True

    def holds(self, spec: ParamSpec) -> bool:
        if spec.block is not None:
            return spec.block in self.blocks
        return self.first if spec.name.startswith("tok_embeddings.") else self.last


def whole_model(cfg: ModelConfig) -> Stage:
    return Stage(tuple(range(cfg.num_layers)))


# Megatron-style TP as `automoe.parallel.tensor_parallel.apply_tp` applies it: column-parallel projections shard
# dim 0 (output features), row-parallel ones dim 1 (input features); the embedding shards the vocabulary and the
# head its output features. Norms (sequence parallel) and the whole MoE layer are replicated over tp; routed
# experts use EP instead.
_TP_COLWISE = (
    "attention.q_proj.",
    "attention.k_proj.",
    "attention.v_proj.",
    "attention.q_b_proj.",  # MLA's per-head up-projections (its down-projections and their norms stay plain)
    "attention.kv_b_proj.",
    "feed_forward.gate_proj.",
    "feed_forward.up_proj.",
)
_TP_ROWWISE = ("attention.o_proj.weight", "feed_forward.down_proj.weight")
_TP_NORMS = ("attention_norm.weight", "ffn_norm.weight")


def tp_shard_dim(spec: ParamSpec) -> int | None:
    """The dim tensor parallelism shards `spec` along, or None when it is replicated over the tp ranks."""
    name = spec.name
    if name in ("tok_embeddings.weight", "output.weight"):
        return 0
    if spec.block is None or ".moe." in name:
        return None
    if any(key in name for key in _TP_COLWISE):
        return 0
    if any(name.endswith(key) for key in _TP_ROWWISE):
        return 1
    return None


def is_tp_param(spec: ParamSpec) -> bool:
    """A DTensor on the tp axis under `apply_tp`: the sharded tensors and the sequence-parallel norms' weights
    (replicated; their gradients are summed over tp in backward). The MoE layer's parameters stay plain."""
    return tp_shard_dim(spec) is not None or spec.name == "norm.weight" or spec.name.endswith(_TP_NORMS)


def tp_local_shape(spec: ParamSpec, tp: int, index: int = 0) -> tuple[int, ...]:
    """`spec`'s shape on tp rank `index` (torch.chunk split of its TP dim, as DTensor `Shard` does)."""
    dim = tp_shard_dim(spec)
    if tp == 1 or dim is None:
        return spec.shape
    shape = list(spec.shape)
    shape[dim] = chunk_len(shape[dim], tp, index)
    return tuple(shape)


def local_param_numel(
    cfg: ModelConfig, layout: Layout, *, rank: int = 0, fsdp: bool = True, stage: Stage | None = None
) -> dict[str, int]:
    """Parameter elements held by `rank`: dense ones split over tp (the TP-sharded ones) and then sharded over
    dp_shard*cp (FSDP), experts over ep x ep_shard; only the pieces of `stage` (default: the whole model).

    Rank coordinates follow the row-major meshes of `ParallelDims` inside one stage: dense (dp_replicate,
    dp_shard*cp, tp) and expert (dp_replicate, ep_shard, ep). Returns {"dense", "expert", "tensors"} (tensors =
    local parameter count).
    """
    stage = whole_model(cfg) if stage is None else stage
    r = rank % layout.stage_size
    tp_index = r % layout.tp
    dense_shards = layout.dp_shard * layout.cp if fsdp else 1
    dense_index = (r // layout.tp) % (layout.dp_shard * layout.cp) if fsdp else 0
    ep_shard_index = (r // layout.ep) % layout.ep_shard
    out = {"dense": 0, "expert": 0, "tensors": 0}
    for spec in param_inventory(cfg):
        if not stage.holds(spec):
            continue
        if spec.expert:
            ep_local = (spec.shape[0] // layout.ep, *spec.shape[1:])
            if fsdp and ep_local[0] < layout.ep_shard and len(ep_local) > 1:
                # fewer local experts than expert-data ranks: FSDP shards dim 1 (automoe.parallel.fsdp)
                ep_local = (ep_local[1], ep_local[0], *ep_local[2:])
            n = shard_numel(ep_local, layout.ep_shard, ep_shard_index) if fsdp else math.prod(ep_local)
            out["expert"] += n
        else:
            out["dense"] += shard_numel(tp_local_shape(spec, layout.tp, tp_index), dense_shards, dense_index)
        out["tensors"] += 1
    return out


def state_bytes(
    cfg: ModelConfig, shape: TrainingShape, layout: Layout, *, rank: int = 0, stage: Stage | None = None
) -> dict[str, int]:
    """Parameter, gradient and AdamW-state bytes on `rank` (gradients in the parameter dtype, states fp32)."""
    numel = local_param_numel(cfg, layout, rank=rank, fsdp=shape.fsdp, stage=stage)
    elems = numel["dense"] + numel["expert"]
    p = DTYPE_BYTES[shape.param_dtype]
    return {
        "params": elems * p,
        "grads": elems * p,
        "optimizer": elems * OPTIMIZER_STATE_BYTES + numel["tensors"] * STEP_BYTES,
    }


def fsdp_unit_numel(cfg: ModelConfig, *, tp: int = 1, stage: Stage | None = None) -> dict[str, int]:
    """Elements per FSDP unit on tp rank 0 (the TP-sharded tensors' local part): the largest block's dense part,
    its experts, the root (embedding, final norm, head), and the totals, over `stage`'s pieces."""
    stage = whole_model(cfg) if stage is None else stage
    dense: dict[int | None, int] = {None: 0}
    expert: dict[int | None, int] = {}
    for spec in param_inventory(cfg):
        if not stage.holds(spec):
            continue
        bucket = expert if spec.expert else dense
        numel = math.prod(spec.shape) if spec.expert else math.prod(tp_local_shape(spec, tp))
        bucket[spec.block] = bucket.get(spec.block, 0) + numel
    blocks = [b for b in dense if b is not None]
    return {
        "root": dense[None],
        "block_dense_max": max((dense[b] for b in blocks), default=0),
        "block_expert_max": max(expert.values(), default=0),
        "blocks_dense_total": sum(dense[b] for b in blocks),
        "expert_total": sum(expert.values()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Activations (bytes saved for backward, per token, one micro-batch in flight)
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


def norm_bytes_per_token(width: int, a: int) -> float:
    """What an RMSNorm saves per token (`automoe.models.norms`: computed in fp32, scaled in the input dtype): the
    fp32 copy of its input (the input itself when a = 4), 1/rms (fp32), and the normalized tensor before the
    weight. Its output is saved by the projection that reads it, counted there as that projection's input."""
    return 4 * width + 4 + a * width


def attention_bytes_per_token(cfg: ModelConfig, a: int, *, tp: int = 1) -> float:
    """Tensors the attention sub-block (with its norm) saves for backward, per local token (a = compute bytes).

    GQA: the norm, the projections' input (D), q and k after RoPE and v (2q + 2kv: RoPE's multiplications save
    only cos/sin), the SDPA output (q; `o_proj` reads it without a copy) and the fp32 log-sum-exp per head
    (flash-style kernels: no S x S matrix); with qk-norm, each norm's fp32 input, 1/rms and normalized tensor;
    below fp32, RoPE saves its cos/sin cast to the compute dtype (4A; in fp32 they are shared by every layer).
    MLA: the same idea over its latent tensors (q_lora, kv_lora, rope key) and the expanded per-head q/k/v.
    Tensor parallel with sequence parallel: the norm holds 1/tp of the sequence, the per-head tensors 1/tp of
    the heads, and the projections' input is the all-gathered full sequence (D); MLA's low-rank latents are
    computed on that full sequence, replicated over tp. Measured: docs/planning.md#validation.
    """
    D, H = cfg.dim, cfg.num_heads
    base = norm_bytes_per_token(D, a) / tp + a * D
    if cfg.attention == "mla":
        N, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        ql = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0
        per_head = H * (N + R) + H * (N + V) + 2 * H * (N + R) + H * R + 2 * H * V
        latent = ql + (C + R) + 2 * C + R
        return base + a * (latent + per_head / tp) + 4 * H / tp
    A, G = cfg.head_dim, cfg.num_kv_heads
    q, kv = H * A, G * A
    per_head = a * (2 * q + 2 * kv) + 4 * H
    if cfg.qk_norm:
        per_head += (4 + a) * (q + kv) + 4 * (H + G)
    rope = 4 * a * A if a != 4 else 0
    return base + per_head / tp + rope


def ffn_bytes_per_token(
    cfg: ModelConfig, layer_id: int, a: int, *, imbalance: float = 1.0, tp: int = 1, ep: int = 1
) -> float:
    """The FFN sub-block: its norm plus a dense SwiGLU (input D; gate, up, silu(gate), product: 4F) or the MoE
    layer.

    MoE, per token: its input (read by the shared experts, and by the router in fp32), the router in fp32 (logits
    and scores 2E, top-k ids (int64) and weights; below fp32 also the input's fp32 copy, fp32 top-k weights and
    their sum, and the slots' int64 sort order, which in fp32 share storage with other tensors); the K-fold expansion of expert
    inputs: K slots x (input row D, up output U = 2F gated or F: the activation is recomputed in backward, expert
    output D kept for the weighting), times `imbalance` on the busiest rank; shared experts as a dense MLP 4 x F_s.
    Under EP the all-to-all path also keeps, per (token, destination rank) pair (u per token,
    `expected_distinct_ranks`), the row sent and the row returned (2D) and the pair's K expert ids and weights.
    Tensor parallel (sequence parallel): the MoE layer routes 1/tp of the sequence on each tp rank, so all of it
    is / tp; the dense MLP keeps its all-gathered input (D) and 1/tp of its hidden features.
    """
    D = cfg.dim
    norm = norm_bytes_per_token(D, a) / tp
    if not cfg.is_moe_layer(layer_id):
        return norm + a * (D + 4 * cfg.ffn_inter_dim / tp)
    moe = cfg.moe
    E, K, F = moe.num_experts, moe.num_activated_experts, moe.moe_inter_dim
    has_shared = moe.shared_inter_dim > 0
    moe_input = a * D if (has_shared or a == 4) else 0
    router = 4 * 2 * E + K * (8 + a)
    if a != 4:  # fp32 copy of the input, the fp32 top-k weights and their sum, the slots' sort order (int64)
        router += 4 * D + 12 * K + 8
    up = 2 * F if moe.gated else F
    routed = imbalance * K * a * (2 * D + up)
    shared = a * 4 * moe.shared_inter_dim
    pairs = expected_distinct_ranks(E, K, ep) * (2 * a * D + K * (a + 8)) if ep > 1 else 0.0
    return norm + (moe_input + router + routed + shared + pairs) / tp


def moe_internal_bytes_per_token(
    cfg: ModelConfig, layer_id: int, a: int, *, imbalance: float, tp: int, ep: int = 1
) -> float:
    """What activation checkpointing of the MoE layer alone (`moe` AC) recomputes: all of the FFN sub-block but
    its norm and the MoE input (the checkpoint keeps that)."""
    D = cfg.dim
    full = ffn_bytes_per_token(cfg, layer_id, a, imbalance=imbalance, tp=tp, ep=ep)
    return (
        full
        - norm_bytes_per_token(D, a) / tp
        - (a * D if (cfg.moe.shared_inter_dim > 0 or a == 4) else 0) / tp
    )


def activation_bytes(
    cfg: ModelConfig, shape: TrainingShape, layout: Layout, *, stage: Stage | None = None
) -> dict[str, float]:
    """Peak bytes saved for backward on one rank for one micro-batch (micro-batches run one after another), over
    the blocks of `stage` (default: the whole model); the head counts only on the last stage.

    T = micro_batch * seq_len / cp local tokens. No AC: every block's saved tensors, T * sum_l bytes_l.
    Full AC: only each block's input (T * a * D, / tp under sequence parallel) plus one block recomputed during
    its backward (T * max_l bytes_l).
    MoE AC: every block's saved tensors except its MoE layer's internals (`moe_internal_bytes_per_token`), plus
    one MoE layer's internals recomputed during its backward.
    Context parallel adds the gathered K/V of the other cp-1 ranks and a bool visibility mask per layer.
    Once per stage: the token ids (int64, first stage) and, in fp32, RoPE's cos/sin (2 x A x 4). The head holds
    its norm, its input (D, all-gathered under tp) and CE's fp32 log-softmax over the vocabulary (whole on every
    tp rank: `apply_tp` all-gathers the logits) and the labels.
    """
    stage = whole_model(cfg) if stage is None else stage
    a, tp = DTYPE_BYTES[shape.compute_dtype], layout.tp
    T = shape.micro_batch * shape.seq_len / layout.cp
    imbalance = shape.routing_imbalance
    per_layer, moe_internals = [0.0], [0.0]
    for i in stage.blocks:
        ffn = ffn_bytes_per_token(cfg, i, a, imbalance=imbalance, tp=tp, ep=layout.ep)
        if shape.activation_checkpointing == "moe" and cfg.is_moe_layer(i):
            internal = moe_internal_bytes_per_token(cfg, i, a, imbalance=imbalance, tp=tp, ep=layout.ep)
            moe_internals.append(T * internal)
            ffn -= internal
        layer = attention_bytes_per_token(cfg, a, tp=tp) + ffn
        per_layer.append(T * layer + _cp_extra_bytes(cfg, shape, layout, a))
    if shape.activation_checkpointing == "full":
        blocks = len(stage.blocks) * T * a * cfg.dim / tp + max(per_layer)
    else:
        blocks = sum(per_layer) + max(moe_internals)
    rope = 2 * cfg.head_dim * 4 if a == 4 and cfg.attention != "mla" else 0
    blocks += T * (rope + (8 if stage.first else 0))
    head = 0.0
    if stage.last:
        head = T * (norm_bytes_per_token(cfg.dim, a) / tp + a * cfg.dim + 4 * cfg.vocab_size + 8)
    return {"blocks": blocks, "head": head}


def kv_width(cfg: ModelConfig, *, tp: int = 1) -> float:
    """Numbers per token the CP K/V gather moves (MLA gathers its compressed latent and shared RoPE key,
    replicated over tp; GQA the tp rank's kv heads)."""
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.num_kv_heads * cfg.head_dim / tp


def _cp_extra_bytes(cfg: ModelConfig, shape: TrainingShape, layout: Layout, a: int) -> float:
    if layout.cp == 1:
        return 0.0
    local = shape.micro_batch * shape.seq_len / layout.cp
    gathered = (layout.cp - 1) * local * (a * kv_width(cfg, tp=layout.tp) + 8)
    mask = local * shape.seq_len  # bool [B, S/cp, S]: one byte per (query, key)
    return gathered + mask

"""Planner memory model: parameter shapes from a meta-device model, per-rank sharding, activations."""

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
    MoE AC: every block's saved tensors except its MoE layer's internals (the MoE input is the FFN norm's
    output, already counted), plus one MoE layer's internals recomputed during its backward.
    Context parallel adds the gathered K/V of the other cp-1 ranks and a bool visibility mask per layer.
    The head holds the logits (a) and CE's fp32 log-softmax (4) over the vocabulary.
    """
    a = DTYPE_BYTES[shape.compute_dtype]
    T = shape.micro_batch * shape.seq_len / layout.cp
    per_layer, moe_internals = [], [0.0]
    for i in range(cfg.num_layers):
        ffn = ffn_bytes_per_token(cfg, i, a, imbalance=shape.routing_imbalance)
        if shape.activation_checkpointing == "moe" and cfg.is_moe_layer(i):
            moe_internals.append(T * (ffn - a * 2 * cfg.dim))  # all but the FFN norm's input and output
            ffn = a * 2 * cfg.dim
        layer = attention_bytes_per_token(cfg, a) + ffn
        per_layer.append(T * layer + _cp_extra_bytes(cfg, shape, layout, a))
    if shape.activation_checkpointing == "full":
        blocks = cfg.num_layers * T * a * cfg.dim + max(per_layer)
    else:
        blocks = sum(per_layer) + max(moe_internals)
    head = T * (a * 2 * cfg.dim + (a + 4) * cfg.vocab_size)
    return {"blocks": blocks, "head": head}


def kv_width(cfg: ModelConfig) -> int:
    """Numbers per token the CP K/V gather moves (MLA gathers its compressed latent and shared RoPE key)."""
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.num_kv_heads * cfg.head_dim


def _cp_extra_bytes(cfg: ModelConfig, shape: TrainingShape, layout: Layout, a: int) -> float:
    if layout.cp == 1:
        return 0.0
    local = shape.micro_batch * shape.seq_len / layout.cp
    gathered = (layout.cp - 1) * local * (a * kv_width(cfg) + 8)
    mask = local * shape.seq_len  # bool [B, S/cp, S]: one byte per (query, key)
    return gathered + mask

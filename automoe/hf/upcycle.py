"""Sparse upcycling: a dense checkpoint (an automoe dense model, or an HF Llama / Qwen2 / Qwen3 directory) turned
into an MoE whose E routed experts start as copies of each layer's dense MLP.

Recipe (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
arXiv:2212.05055): every expert is a copy of the dense MLP, the router is newly initialized at random
(N(0, router_std^2), default the model's init_std), attention, norms and embeddings are kept. Routing is softmax
then top-k with the K weights renormalized to sum to 1 (as He et al. 2024, "Upcycling Large Language Models into
Mixture of Experts", arXiv:2410.07524, do to keep the dense model's output scale), so at initialization every token
gets sum_k w_k * MLP(x) = MLP(x): the upcycled model computes the dense model's logits. `noise` > 0 adds Gaussian
noise of that relative scale (times each weight matrix's std) to every expert copy to break their symmetry (our
option, not taken from the papers above; 0 = exact copies, which still diverge as the experts see different
tokens). With `shared_expert=True` the dense MLP is also kept as an always-on shared expert; its down projection
and the routed experts' are halved so that the sum is again the dense MLP at initialization.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.hf.config_map import read_hf_config
from automoe.hf.families.base import Family, check_common, gqa_heads, plain_rope, require
from automoe.hf.safetensors_io import SafetensorsReader
from automoe.models.transformer import Transformer

# HF dense model_type -> its ModelConfig attention settings (biases, q/k norm)
DENSE_HF_TYPES: dict[str, dict[str, Any]] = {
    "llama": {},  # attention_bias from config.json
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
}


def dense_config_from_hf(hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
    """The all-dense ModelConfig of an HF Llama / Qwen2 / Qwen3 `config.json` (raises naming what cannot map)."""
    model_type = hf.get("model_type")
    if model_type not in DENSE_HF_TYPES:
        raise ValueError(
            f"upcycling reads dense HF models of model_type {list(DENSE_HF_TYPES)}, got {model_type!r}"
        )
    check_common(hf)
    require(hf, "mlp_bias", (False,), "automoe's dense FFN has no biases")
    fields = dict(DENSE_HF_TYPES[model_type])
    if model_type == "llama":
        fields["attention_bias"] = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **Family().common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
        **gqa_heads(hf),
        num_dense_layers=hf["num_hidden_layers"],
        **fields,
        **plain_rope(hf, model_type),
    )


def load_dense_hf(
    path: str | Path, *, max_seq_len: int | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(ModelConfig, automoe state dict) of a dense HF Llama / Qwen2 / Qwen3 directory (fp32)."""
    cfg = dense_config_from_hf(read_hf_config(path), max_seq_len=max_seq_len)
    plan = Family().build_plan(cfg)  # all layers dense: embeddings, attention, norms, dense MLPs
    reader = SafetensorsReader(path)
    missing = set(plan.direct.values()) - reader.keys()
    if missing:
        raise ValueError(f"HF checkpoint {str(path)!r} lacks {sorted(missing)[:8]}")
    state = {ours: reader.get(hf).float() for ours, hf in plan.direct.items()}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return cfg, state


def upcycle_from(path: str | Path, **upcycle_kwargs: Any) -> Transformer:
    """The upcycled MoE of a dense checkpoint directory: an HF Llama / Qwen2 / Qwen3 directory, or an automoe one
    (`model_config.yaml` + `model.pt` / DCP `model/`, `python -m automoe.convert`'s layout); `upcycle_kwargs` go to
    `upcycle` (num_experts, top_k, shared_expert, noise, ...)."""
    from automoe.convert import CONFIG_NAME, read_automoe  # the converter imports automoe.hf

    path = Path(path)
    dense_cfg, dense_state = read_automoe(path) if (path / CONFIG_NAME).is_file() else load_dense_hf(path)
    return upcycle(dense_cfg, dense_state, **upcycle_kwargs)


def upcycled_config(
    dense: ModelConfig,
    *,
    num_experts: int,
    top_k: int,
    shared_expert: bool = False,
    num_dense_layers: int = 0,
    aux_loss_coeff: float = 0.01,
) -> ModelConfig:
    """The MoE config of `dense` upcycled: layers >= num_dense_layers get E experts of the dense width."""
    moe = MoEConfig(
        moe_inter_dim=dense.ffn_inter_dim,
        num_experts=num_experts,
        num_activated_experts=top_k,
        num_shared_experts=1 if shared_expert else 0,
        score_func="softmax",
        softmax_before_topk=True,
        norm_topk_prob=True,  # the K weights sum to 1: the upcycled model starts as the dense one
        aux_loss_coeff=aux_loss_coeff,
    )
    return dataclasses.replace(
        dense, num_dense_layers=num_dense_layers, moe_layer_freq=1, dense_layers=[], moe=moe
    )


@torch.no_grad()
def upcycle(
    dense: ModelConfig,
    dense_state: dict[str, Tensor],
    *,
    num_experts: int,
    top_k: int,
    shared_expert: bool = False,
    num_dense_layers: int = 0,
    noise: float = 0.0,
    router_std: float | None = None,
    aux_loss_coeff: float = 0.01,
    seed: int = 0,
) -> Transformer:
    """The upcycled MoE `Transformer` of a dense model's config and state dict (see the module docstring)."""
    if noise < 0:
        raise ValueError(f"upcycle noise={noise} must be >= 0")
    cfg = upcycled_config(
        dense,
        num_experts=num_experts,
        top_k=top_k,
        shared_expert=shared_expert,
        num_dense_layers=num_dense_layers,
        aux_loss_coeff=aux_loss_coeff,
    )
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()  # buffers, RoPE tables; every parameter is overwritten below
    state = model.state_dict()
    for key, value in dense_state.items():
        if ".feed_forward." not in key or not cfg.is_moe_layer(int(key.split(".")[1])):
            state[key].copy_(value)
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            _upcycle_layer(state, dense_state, f"layers.{i}.", cfg, noise, router_std, generator)
    model.tie_weights()
    return model


def _upcycle_layer(state, dense_state, prefix, cfg, noise, router_std, generator) -> None:
    """Experts (and shared expert) of one layer from its dense MLP; a fresh router."""
    ffn, moe = prefix + "feed_forward.", prefix + "moe."
    gate_FD, up_FD, down_DF = (dense_state[ffn + f"{p}_proj.weight"] for p in ("gate", "up", "down"))
    scale = 0.5 if cfg.moe.num_shared_experts else 1.0  # shared + routed = the dense MLP at init
    w_up_DU = torch.cat([gate_FD, up_FD], dim=0).T
    w_down_FD = down_DF.T * scale
    for key, one in ((moe + "experts.w_up", w_up_DU), (moe + "experts.w_down", w_down_FD)):
        copies = one.expand(cfg.moe.num_experts, *one.shape).clone()
        if noise:
            copies += noise * one.std() * torch.randn(copies.shape, generator=generator)
        state[key].copy_(copies)
    if cfg.moe.num_shared_experts:
        for proj, weight in (("gate", gate_FD), ("up", up_FD), ("down", down_DF * scale)):
            state[moe + f"shared_experts.{proj}_proj.weight"].copy_(weight)
    std = cfg.init_std if router_std is None else router_std
    router = state[moe + "gate.weight"]
    router.copy_(std * torch.randn(router.shape, generator=generator))

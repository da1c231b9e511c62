"""The tensor plan between automoe state-dict keys and HF checkpoint keys, and the expert layout conversions.

Every automoe tensor is either `direct` (one HF tensor of the same shape and layout) or a stacked expert
tensor built from one HF tensor per expert:
  w_up   [E, D, 2F] = stack_e( cat([gate_e, up_e], rows).T )   gate_e, up_e: HF [F, D]
  w_down [E, F, D]  = stack_e( down_e.T )                      down_e: HF [D, F]
Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from automoe.config.model import ModelConfig

_EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),  # gate, up, down
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
}
_MLA_DIRECT = (
    ("q_proj", "q_proj"),
    ("q_a_proj", "q_a_proj"),
    ("q_a_norm", "q_a_layernorm"),
    ("q_b_proj", "q_b_proj"),
    ("kv_a_proj", "kv_a_proj_with_mqa"),
    ("kv_a_norm", "kv_a_layernorm"),
    ("kv_b_proj", "kv_b_proj"),
    ("o_proj", "o_proj"),
)


@dataclass(frozen=True)
class ExpertTensor:
    """One stacked expert tensor: `ours` [E, ...] from the per-expert HF keys `hf_templates` (with `{e}`)."""

    ours: str
    kind: str  # "up" (gate and up templates) | "down" (one template)
    hf_templates: tuple[str, ...]

    def hf_keys(self, expert: int) -> tuple[str, ...]:
        return tuple(t.format(e=expert) for t in self.hf_templates)


@dataclass
class TensorPlan:
    """direct: ours -> HF key; experts: the stacked expert tensors; optional: HF keys that may be absent."""

    direct: dict[str, str] = field(default_factory=dict)
    experts: list[ExpertTensor] = field(default_factory=list)
    optional_hf: set[str] = field(default_factory=set)
    ignored_hf: re.Pattern | None = None  # HF keys accounted for but not imported (DeepSeek MTP layers)

    def hf_keys(self, num_experts: int) -> set[str]:
        keys = set(self.direct.values())
        for spec in self.experts:
            for e in range(num_experts):
                keys.update(spec.hf_keys(e))
        return keys

    def ours_keys(self) -> set[str]:
        return set(self.direct) | {spec.ours for spec in self.experts}


def build_plan(cfg: ModelConfig, family: str) -> TensorPlan:
    """The complete mapping for a model of `cfg` in the HF `family` layout."""
    plan = TensorPlan()
    d = plan.direct
    d["tok_embeddings.weight"] = "model.embed_tokens.weight"
    d["norm.weight"] = "model.norm.weight"
    if cfg.tie_embeddings:
        plan.optional_hf.add("lm_head.weight")  # tied: HF may or may not write it
    else:
        d["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        d[ours + "attention_norm.weight"] = hf + "input_layernorm.weight"
        d[ours + "ffn_norm.weight"] = hf + "post_attention_layernorm.weight"
        _attention(d, cfg, ours + "attention.", hf + "self_attn.")
        if cfg.is_moe_layer(i):
            _moe(
                plan,
                cfg,
                family,
                ours + "moe.",
                hf + ("block_sparse_moe." if family == "mixtral" else "mlp."),
            )
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                d[ours + f"feed_forward.{proj}.weight"] = hf + f"mlp.{proj}.weight"
    if family == "deepseek_v3":  # multi-token-prediction layers live after the main stack; not imported
        plan.ignored_hf = re.compile(r"model\.layers\.(\d+)\.")
    return plan


def _attention(d: dict[str, str], cfg: ModelConfig, ours: str, hf: str) -> None:
    bias = cfg.attention_bias
    if cfg.attention == "mla":
        for our_name, hf_name in _MLA_DIRECT:
            if our_name == "q_proj" and cfg.q_lora_rank is not None:
                continue
            if our_name in ("q_a_proj", "q_a_norm", "q_b_proj") and cfg.q_lora_rank is None:
                continue
            d[ours + f"{our_name}.weight"] = hf + f"{hf_name}.weight"
            if bias and our_name in ("q_a_proj", "kv_a_proj", "o_proj"):
                d[ours + f"{our_name}.bias"] = hf + f"{hf_name}.bias"
        return
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        d[ours + f"{proj}.weight"] = hf + f"{proj}.weight"
        if bias:
            d[ours + f"{proj}.bias"] = hf + f"{proj}.bias"
    if cfg.qk_norm:
        d[ours + "q_norm.weight"] = hf + "q_norm.weight"
        d[ours + "k_norm.weight"] = hf + "k_norm.weight"


def _moe(plan: TensorPlan, cfg: ModelConfig, family: str, ours: str, hf: str) -> None:
    d, moe = plan.direct, cfg.moe
    d[ours + "gate.weight"] = hf + "gate.weight"
    if moe.has_correction_bias:
        d[ours + "gate.correction_bias"] = hf + "gate.e_score_correction_bias"
    if moe.num_shared_experts:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            d[ours + f"shared_experts.{proj}.weight"] = hf + f"shared_experts.{proj}.weight"
    gate, up, down = _EXPERT_NAMES[family]
    plan.experts.append(
        ExpertTensor(
            ours + "experts.w_up",
            "up",
            (hf + f"experts.{{e}}.{gate}.weight", hf + f"experts.{{e}}.{up}.weight"),
        )
    )
    plan.experts.append(ExpertTensor(ours + "experts.w_down", "down", (hf + f"experts.{{e}}.{down}.weight",)))


def is_ignored(plan: TensorPlan, key: str, num_layers: int) -> bool:
    """True for HF keys that are accounted for without import: DeepSeek MTP layers (index >= num_layers)."""
    if plan.ignored_hf is None:
        return False
    match = plan.ignored_hf.match(key)
    return match is not None and int(match.group(1)) >= num_layers


# ---- per-expert layout conversions ----
def hf_expert_shapes(spec: ExpertTensor, ours_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """HF shapes of one expert's tensors for an automoe stacked tensor of `ours_shape` ([E, D, 2F] / [E, F, D])."""
    if spec.kind == "up":
        _, D, H = ours_shape
        return (H // 2, D), (H // 2, D)
    _, Fd, D = ours_shape
    return ((D, Fd),)


def expert_to_ours(spec: ExpertTensor, hf_tensors: list[Tensor]) -> Tensor:
    """One expert's HF tensors -> its automoe slice ([D, 2F] for up, [F, D] for down)."""
    if spec.kind == "up":
        gate_FD, up_FD = hf_tensors
        return torch.cat([gate_FD, up_FD], dim=0).T
    return hf_tensors[0].T


def expert_to_hf(spec: ExpertTensor, slice_: Tensor) -> list[Tensor]:
    """One expert's automoe slice -> its HF tensors (inverse of `expert_to_ours`)."""
    if spec.kind == "up":
        gate_DF, up_DF = slice_.chunk(2, dim=-1)
        return [gate_DF.T, up_DF.T]
    return [slice_.T]

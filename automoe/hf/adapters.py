"""The tensor plan between automoe state-dict keys and HF checkpoint keys, and the expert layout conversions.

A plan is built by a family (`automoe/hf/families/`) for one config and one expert layout. Every automoe tensor is
either `direct` (one HF tensor of the same shape and layout) or a stacked expert tensor, stored by HF in one of
two layouts (both are read; `transformers` v5 keeps the fused one in memory and newer checkpoints store it):
  per_expert  one 2-D tensor per expert and projection (`experts.{e}.gate_proj.weight` [F, D], ...):
                w_up   [E, D, 2F] = stack_e( cat([gate_e, up_e], rows).T )   gate_e, up_e: HF [F, D]
                w_down [E, F, D]  = stack_e( down_e.T )                      down_e: HF [D, F]
  fused       one 3-D tensor per projection kind (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj`
              [E, D, F]); both are the automoe tensor with its last two dims swapped (`fused_form="transposed"`).
              GPT-OSS stores them untransposed with gate and up columns interleaved (`"interleaved"`:
              `gate_up_proj` [E, D, 2F], gate = [..., 0::2], up = [..., 1::2], and its bias [E, 2F] alike) or as
              they are (`"same"`: `down_proj` [E, F, D], biases [E, D]).
Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

EXPERT_LAYOUTS = ("per_expert", "fused")


@dataclass(frozen=True)
class ExpertTensor:
    """One stacked expert tensor `ours` [E, ...]: per-expert HF keys `hf_templates` (with `{e}`; gate and up for
    kind "up", down for "down") or, in the fused layout, the one 3-D HF tensor `fused_key`."""

    ours: str
    kind: str  # "up" | "down"
    hf_templates: tuple[str, ...]  # () when the family has no per-expert layout (GPT-OSS)
    fused_key: str
    fused_form: str = "transposed"  # transposed | interleaved | same: the fused HF tensor vs ours (see above)

    def hf_keys(self, expert: int) -> tuple[str, ...]:
        return tuple(t.format(e=expert) for t in self.hf_templates)


@dataclass
class TensorPlan:
    """direct: ours -> HF key; experts: the stacked expert tensors, stored in `layout`; optional: HF keys that may
    be absent; fp32_hf: HF keys exported in fp32 whatever the export dtype (selection biases)."""

    layout: str = "per_expert"
    direct: dict[str, str] = field(default_factory=dict)
    experts: list[ExpertTensor] = field(default_factory=list)
    optional_hf: set[str] = field(default_factory=set)
    fp32_hf: set[str] = field(default_factory=set)
    ignored_hf: re.Pattern | None = None  # HF keys accounted for but not imported (DeepSeek MTP layers)
    # HF key -> automoe key: copies written on export and not read on import (DeepSeek MTP embedding and head)
    duplicates: dict[str, str] = field(default_factory=dict)

    def hf_keys(self, num_experts: int) -> set[str]:
        keys = set(self.direct.values())
        for spec in self.experts:
            if self.layout == "fused":
                keys.add(spec.fused_key)
                continue
            for e in range(num_experts):
                keys.update(spec.hf_keys(e))
        return keys

    def ours_keys(self) -> set[str]:
        return set(self.direct) | {spec.ours for spec in self.experts}


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


# ---- fused layout conversions ("transposed": swap the last two dims, the same for up and down) ----
def fused_shape(spec: ExpertTensor, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF fused shape ([E, 2F, D] / [E, D, F] transposed) of an automoe stacked tensor of `ours_shape`
    ([E, D, 2F] / [E, F, D])."""
    if spec.fused_form != "transposed":
        return tuple(ours_shape)
    E, a, b = ours_shape
    return (E, b, a)


def fused_to_ours(spec: ExpertTensor, fused: Tensor) -> Tensor:
    """HF fused rows -> automoe rows: [n, 2F, D] / [n, D, F] -> [n, D, 2F] / [n, F, D] (gate rows first = gate
    columns first); interleaved gate/up columns -> gate columns first."""
    if spec.fused_form == "interleaved":
        return torch.cat([fused[..., 0::2], fused[..., 1::2]], dim=-1)
    return fused if spec.fused_form == "same" else fused.transpose(1, 2)


def ours_to_fused(spec: ExpertTensor, stacked: Tensor) -> Tensor:
    """Inverse of `fused_to_ours`."""
    if spec.fused_form == "interleaved":
        gate, up = stacked.chunk(2, dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)
    return stacked if spec.fused_form == "same" else stacked.transpose(1, 2)

"""Gates (routers) of the MoE layer and `build_gate`, which picks one by `MoEConfig.gate`.

Every gate: `forward(x_TD, valid_T) -> RouterOutput`, `init_weights(*, std)`, `num_experts`, `top_k`.
"""

from __future__ import annotations

import importlib

from torch import nn

from automoe.config.gates import gate_spec
from automoe.config.moe import MoEConfig
from automoe.moe.gates.fake import FakeBalancedGate
from automoe.moe.gates.hybrid import HybridGate
from automoe.moe.gates.noisy import NoisyTopKGate, cv_squared, prob_in_top_k
from automoe.moe.gates.topk import TopKGate, group_limited_mask


def gate_class(name: str) -> type[nn.Module]:
    """The class registered for gate `name` (`automoe.config.gates`), imported on first use."""
    target = gate_spec(name).target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    return target


def build_gate(cfg: MoEConfig) -> nn.Module:
    """The gate named by `cfg.gate`, built on the current default device (call `init_weights` after)."""
    return gate_class(cfg.gate)(cfg)


__all__ = [
    "FakeBalancedGate",
    "HybridGate",
    "NoisyTopKGate",
    "TopKGate",
    "build_gate",
    "gate_class",
    "cv_squared",
    "group_limited_mask",
    "prob_in_top_k",
]

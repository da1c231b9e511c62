"""Gates (routers) of the MoE layer and `build_gate`, which picks one by `MoEConfig.gate`.

Every gate: `forward(x_TD, valid_T) -> RouterOutput`, `init_weights(*, std)`, `num_experts`, `top_k`.
"""

from __future__ import annotations

from torch import nn

from automoe.config.moe import MoEConfig
from automoe.moe.gates.fake import FakeBalancedGate
from automoe.moe.gates.hybrid import HybridGate
from automoe.moe.gates.noisy import NoisyTopKGate, cv_squared, prob_in_top_k
from automoe.moe.gates.topk import TopKGate, group_limited_mask

GATE_CLASSES: dict[str, type[nn.Module]] = {
    "topk": TopKGate,
    "fake_balanced": FakeBalancedGate,
    "noisy_topk": NoisyTopKGate,
    "hybrid": HybridGate,
}


def build_gate(cfg: MoEConfig) -> nn.Module:
    """The gate named by `cfg.gate`, built on the current default device (call `init_weights` after)."""
    if cfg.gate not in GATE_CLASSES:
        raise ValueError(f"MoEConfig.gate={cfg.gate!r} is not one of {sorted(GATE_CLASSES)}")
    return GATE_CLASSES[cfg.gate](cfg)


__all__ = [
    "FakeBalancedGate",
    "HybridGate",
    "NoisyTopKGate",
    "TopKGate",
    "build_gate",
    "cv_squared",
    "group_limited_mask",
    "prob_in_top_k",
]

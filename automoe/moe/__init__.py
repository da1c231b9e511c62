"""Mixture-of-Experts building blocks: gates, experts, dispatch, losses and the MoE layer (no torch.distributed)."""

from automoe.moe.balance import step_expert_loads, update_gate_biases
from automoe.moe.layer import MoE, collect_aux_loss, moe_layers, set_step_totals, uses_step_totals
from automoe.moe.losses import StepTotals

__all__ = [
    "MoE",
    "StepTotals",
    "collect_aux_loss",
    "moe_layers",
    "set_step_totals",
    "step_expert_loads",
    "update_gate_biases",
    "uses_step_totals",
]

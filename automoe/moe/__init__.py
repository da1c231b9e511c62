"""Mixture-of-Experts building blocks: gates, experts, dispatch, losses and the MoE layer (no torch.distributed)."""

from automoe.moe.balance import step_expert_loads, update_gate_biases
from automoe.moe.layer import MoE, collect_aux_loss, moe_layers

__all__ = ["MoE", "collect_aux_loss", "moe_layers", "step_expert_loads", "update_gate_biases"]

"""Mixture-of-Experts building blocks: gates, experts, dispatch, losses and the MoE layer (no torch.distributed)."""

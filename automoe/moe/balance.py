"""Per-step expert load and the DeepSeek-V3 aux-loss-free gate bias update."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from automoe.moe.layer import MoE, moe_layers

SumFn = Callable[[Tensor], Tensor]


def step_expert_loads(model: nn.Module, *, sum_fn: SumFn | None = None) -> dict[str, Tensor]:
    """Training load accumulated this step per MoE layer, summed over ranks by `sum_fn` in one call.

    `sum_fn` all-reduces a [num_layers, E] tensor over every data-parallel and context-parallel rank; None on
    one process. Returns {layer name: load_E} (int64 token-slot counts, copies).
    """
    layers = list(moe_layers(model))
    if not layers:
        return {}
    layer_loads = torch.stack([m.expert_load for _, m in layers]).clone()  # (num_layers, E)
    if sum_fn is not None:
        layer_loads = sum_fn(layer_loads)
    return {name: layer_loads[i] for i, (name, _) in enumerate(layers)}


@torch.no_grad()
def update_gate_biases(model: nn.Module, *, sum_fn: SumFn | None = None) -> dict[str, Tensor]:
    """After `optimizer.step()`: b_e += gamma * sign(mean(L) - L_e) for every layer with gamma > 0.

    The sign is taken on integers, sign(sum(L) - E * L_e) (exact; a float count could round a near-mean expert
    to the wrong side), and gamma * sign is applied to the fp32 bias: the same update in any model dtype.

    L is the step's load summed over all data ranks (`sum_fn`), so biases stay identical everywhere. Optional
    mean-centring of the update (`bias_update_mean_center`). No-op for frozen gates, gamma = 0 and layers in eval
    mode. Resets every layer's per-step statistics and returns the reduced loads for logging.
    """
    loads = step_expert_loads(model, sum_fn=sum_fn)
    for name, layer in moe_layers(model):
        if _bias_update_enabled(layer):
            load_E = loads[name]
            sign_E = torch.sign(load_E.sum() - load_E.numel() * load_E).to(torch.float32)
            delta_E = layer.cfg.gate_bias_update_factor * sign_E
            if layer.cfg.bias_update_mean_center:
                delta_E = delta_E - delta_E.mean()
            layer.gate.update_bias(delta_E)
        layer.reset_statistics()
    return loads


def _bias_update_enabled(layer: MoE) -> bool:
    cfg = layer.cfg
    return (
        layer.training
        and cfg.train_gate
        and cfg.gate_bias_update_factor > 0
        and layer.gate_spec.selection_bias
    )

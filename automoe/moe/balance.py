"""Per-step expert load and the DeepSeek-V3 aux-loss-free gate bias update (sign rule, an adaptive rule, and an
optional drift term for either)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from automoe.moe.layer import MoE, moe_layers

SumFn = Callable[[Tensor], Tensor]

# bias_update_rule=adaptive: expert e moves by gamma * 2^(k_e/4) * sign(err_e). k_e grows by 1 (step x 1.19) when
# err_e has the sign of the last step, drops by 4 (step x 0.5) when it flips, stays when either is 0; bounded so
# the step lies in [gamma, gamma*128]. Integer k: the same on every rank and layout, whatever the dtype.
# The floor is gamma itself: a step's load is a sample (at 512 tokens a step the per-expert count has ~10% noise),
# so near balance the sign flips at random and the halvings took an unbounded step down to gamma/1024, where the
# bias stopped following the router (1000-step study, docs/load_balancing.md); at gamma the rule jitters no more
# than the sign rule with the same gamma, and grows only while an expert stays on one side.
ADAPTIVE_UP, ADAPTIVE_DOWN = 1, -4
ADAPTIVE_MIN_EXPONENT, ADAPTIVE_MAX_EXPONENT = 0, 28


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
    """After `optimizer.step()`: b_e += gamma * sign(mean(L) - L_e) for every layer with gamma > 0 (sign rule).

    With `bias_update_rule=adaptive` each expert's step is gamma * 2^(k_e/4) instead of gamma (Rprop-style, see
    `adaptive_steps`): it grows while the expert stays on one side of the mean load and halves when it crosses, so
    the bias catches up fast whatever the score scale and then jitters little; gamma only sets the first step.

    The sign is taken on integers, sign(sum(L) - E * L_e) (exact; a float count could round a near-mean expert
    to the wrong side), and gamma * sign is applied to the fp32 bias: the same update in any model dtype.

    L is the step's load summed over all data ranks (`sum_fn`), so biases stay identical everywhere. Optional
    mean-centring of the update (`bias_update_mean_center`). No-op for frozen gates, gamma = 0 and layers in eval
    mode. Resets every layer's per-step statistics and returns the reduced loads for logging.

    `bias_update_drift` = kappa > 0 adds a drift term to either rule (`drift_update`).
    """
    loads = step_expert_loads(model, sum_fn=sum_fn)
    for name, layer in moe_layers(model):
        if _bias_update_enabled(layer):
            load_E = loads[name]
            sign_E = torch.sign(load_E.sum() - load_E.numel() * load_E)  # int64
            step_E = layer.cfg.gate_bias_update_factor
            if layer.cfg.bias_update_rule == "adaptive":
                step_E = step_E * adaptive_steps(layer, sign_E)
            delta_E = step_E * sign_E.to(torch.float32)
            if layer.cfg.bias_update_drift > 0:
                delta_E = drift_update(layer, delta_E)
            if layer.cfg.bias_update_mean_center:
                delta_E = delta_E - delta_E.mean()
            layer.gate.update_bias(delta_E)
        layer.reset_statistics()
    return loads


def adaptive_steps(layer: MoE, sign_E: Tensor) -> Tensor:
    """Advance the layer's step exponents k_E by this step's integer signs; -> 2^(k_E/4), fp32 [E].

    Same sign as the last update: k += ADAPTIVE_UP; opposite: k += ADAPTIVE_DOWN; a zero sign either time: k
    stays. The signs are stored for the next step. Both buffers are persistent (checkpointed).
    """
    agree_E = sign_E * layer.bias_last_sign
    change_E = torch.where(agree_E > 0, ADAPTIVE_UP, torch.where(agree_E < 0, ADAPTIVE_DOWN, 0))
    exponent_E = (layer.bias_step_exponent + change_E).clamp(ADAPTIVE_MIN_EXPONENT, ADAPTIVE_MAX_EXPONENT)
    layer.bias_step_exponent.copy_(exponent_E)
    layer.bias_last_sign.copy_(sign_E)
    return torch.exp2(exponent_E.to(torch.float32) / 4)


def drift_update(layer: MoE, delta_E: Tensor) -> Tensor:
    """The drift term: -> delta_E + v_E, then v_E += kappa * delta_E (v_E: the layer's `bias_velocity`, fp32).

    The bias then follows a router that drifts at a steady rate without a standing lag: a bias that keeps moving
    the same way accumulates the velocity that carries it, instead of waiting each step for the load error to
    build up again (a double integrator). The velocity is kappa times the sum of all past updates."""
    velocity_E = layer.bias_velocity
    out_E = delta_E + velocity_E
    velocity_E.add_(layer.cfg.bias_update_drift * delta_E)
    return out_E


def _bias_update_enabled(layer: MoE) -> bool:
    cfg = layer.cfg
    return (
        layer.training
        and cfg.train_gate
        and cfg.gate_bias_update_factor > 0
        and layer.gate_spec.selection_bias
    )

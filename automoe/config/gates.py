"""The gate registry: every gate's name, the class that implements it and what the gate declares it does.

Light on purpose (no torch): `MoEConfig` validates `gate` against it and `automoe.moe.gates.build_gate` imports the
class only when a layer is built. The MoE layer, the bias balancer and `MoEConfig` read a gate's declared
capabilities, never its name: a new gate is one file under `automoe/moe/gates/` plus one `register_gate` line.
"""

from __future__ import annotations

from dataclasses import dataclass

from automoe.config.checks import check_choice


@dataclass(frozen=True)
class GateSpec:
    """What the registry knows of one gate: where its class lives and what its `RouterOutput` and methods offer."""

    target: str | type  # "module:Class" of the gate nn.Module (imported when a layer is built), or the class
    balancing_probs: bool = False  # probs_TE feed the Switch/GShard aux loss (weighted by aux_loss_coeff)
    own_loss: bool = (
        False  # returns its own gate_loss, already weighted by aux_loss_coeff, instead of the aux loss
    )
    router_logits: bool = False  # returns logits_TE, so the router z-loss (z_loss_coeff) applies
    selection_bias: bool = (
        False  # a per-expert selection bias and `update_bias(delta_E)`: gate_bias_update_factor
    )
    own_fields: tuple[
        str, ...
    ] = ()  # MoEConfig fields only this gate reads (set with another gate: a warning)

    @property
    def uses_aux_loss_coeff(self) -> bool:
        return self.balancing_probs or self.own_loss


GATES: dict[str, GateSpec] = {}


def register_gate(name: str, spec: GateSpec) -> None:
    """Make `MoEConfig(gate=name)` valid and buildable."""
    if name in GATES:
        raise ValueError(f"gate {name!r} is already registered ({GATES[name].target})")
    GATES[name] = spec


def gate_spec(name: str) -> GateSpec:
    """The registered spec of gate `name` (ValueError naming `MoEConfig.gate` when there is none)."""
    check_choice("MoEConfig.gate", name, GATES)
    return GATES[name]


def gates_with(capability: str) -> list[str]:
    """Names of the registered gates declaring `capability` (a GateSpec flag), for error messages."""
    return [name for name, spec in GATES.items() if getattr(spec, capability)]


register_gate(
    "topk",
    GateSpec(
        "automoe.moe.gates.topk:TopKGate", balancing_probs=True, router_logits=True, selection_bias=True
    ),
)
register_gate(
    "fake_balanced",
    GateSpec(
        "automoe.moe.gates.fake:FakeBalancedGate",
        own_fields=("fake_gate_noise", "fake_gate_skip_first_n_experts"),
    ),
)
register_gate(
    "noisy_topk", GateSpec("automoe.moe.gates.noisy:NoisyTopKGate", own_loss=True, router_logits=True)
)
register_gate(
    "hybrid", GateSpec("automoe.moe.gates.hybrid:HybridGate", balancing_probs=True, router_logits=True)
)

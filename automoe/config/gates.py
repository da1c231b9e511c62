"""The gate registry: every gate's name and the class that implements it, kept in one place.

Light on purpose (no torch): `MoEConfig` validates `gate` against it and `automoe.moe.gates.build_gate` imports the
class only when a layer is built. A new gate is one file under `automoe/moe/gates/` plus one `register_gate` line.
"""

from __future__ import annotations

from dataclasses import dataclass

from automoe.config.checks import check_choice


@dataclass(frozen=True)
class GateSpec:
    """What the registry knows of one gate."""

    target: str | type  # "module:Class" of the gate nn.Module (imported when a layer is built), or the class


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


register_gate("topk", GateSpec("automoe.moe.gates.topk:TopKGate"))
register_gate("fake_balanced", GateSpec("automoe.moe.gates.fake:FakeBalancedGate"))
register_gate("noisy_topk", GateSpec("automoe.moe.gates.noisy:NoisyTopKGate"))
register_gate("hybrid", GateSpec("automoe.moe.gates.hybrid:HybridGate"))

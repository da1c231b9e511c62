"""The gate registry (automoe/config/gates.py): config names and gate classes cannot drift apart."""

import pytest
from torch import nn

from automoe.config.gates import GATES, GateSpec, register_gate
from automoe.config.moe import MoEConfig
from automoe.moe.gates import build_gate, gate_class


@pytest.mark.parametrize("name", sorted(GATES))
def test_every_registered_gate_builds_from_its_config_name(name):
    cls = gate_class(name)
    assert isinstance(cls, type) and issubclass(cls, nn.Module)
    assert type(build_gate(MoEConfig(gate=name, dim=16, num_experts=4))) is cls


def test_unregistered_names_fail_in_the_config_and_in_build_gate():
    with pytest.raises(ValueError, match="MoEConfig.gate='switch' is not one of"):
        MoEConfig(gate="switch")
    cfg = MoEConfig()
    cfg.gate = "switch"
    with pytest.raises(ValueError, match="MoEConfig.gate='switch' is not one of"):
        build_gate(cfg)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="gate 'topk' is already registered"):
        register_gate("topk", GateSpec("automoe.moe.gates.topk:TopKGate"))

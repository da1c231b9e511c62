"""Gates declare what they do (`GateSpec` in automoe/config/gates.py); the layer, the balancer and the config read
the declaration, never the gate's name. A new gate is one file plus its registration: the toy gate below is both.

Letters: T tokens, D model dim, E experts, K slots per token.
"""

import warnings

import pytest
import torch
from torch import Tensor, nn

from automoe.config.gates import GATES, GateSpec
from automoe.config.moe import MoEConfig
from automoe.moe import collect_aux_loss, update_gate_biases
from automoe.moe.layer import MoE
from automoe.moe.types import RouterOutput

D, E, K = 8, 4, 2


class ToyGate(nn.Module):
    """Linear router, softmax over E, top-k with a per-expert selection bias (the whole 'new gate' file)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_activated_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim))
        self.register_buffer("bias_E", torch.zeros(cfg.num_experts))

    def init_weights(self, *, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        self.bias_E.zero_()

    def update_bias(self, delta_E: Tensor) -> None:
        self.bias_E += delta_E

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> RouterOutput:
        logits_TE = x_TD @ self.weight.T
        probs_TE = torch.softmax(logits_TE, dim=-1)
        indices_TK = (probs_TE.detach() + self.bias_E).topk(self.top_k, dim=-1).indices
        return RouterOutput(
            probs_TE.gather(1, indices_TK), indices_TK, probs_TE=probs_TE, logits_TE=logits_TE
        )


TOY = GateSpec(ToyGate, balancing_probs=True, router_logits=True, selection_bias=True)


def _layer(**kw) -> MoE:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=D, moe_inter_dim=8, num_experts=E, num_activated_experts=K, **kw))
    layer.init_weights(std=0.5)
    return layer


def test_a_registered_toy_gate_trains_balances_and_updates_its_bias(monkeypatch):
    monkeypatch.setitem(GATES, "toy", TOY)
    layer = _layer(gate="toy", aux_loss_coeff=0.01, z_loss_coeff=0.001, gate_bias_update_factor=0.1)
    assert isinstance(layer.gate, ToyGate)
    y = layer(torch.randn(2, 5, D))
    assert set(layer.loss_values) == {"aux_loss", "z_loss"}
    (y.square().sum() + collect_aux_loss(layer)).backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    load_E = layer.expert_load.clone()
    update_gate_biases(nn.ModuleList([layer]))
    torch.testing.assert_close(
        layer.gate.bias_E, 0.1 * torch.sign(load_E.double().mean() - load_E).float(), rtol=0, atol=0
    )


def test_config_checks_come_from_the_declaration(monkeypatch):
    monkeypatch.setitem(GATES, "toy", GateSpec(ToyGate))  # declares nothing
    with pytest.raises(ValueError, match=r"gate_bias_update_factor > 0 needs a gate with a selection bias"):
        MoEConfig(gate="toy", gate_bias_update_factor=0.1)
    with pytest.warns(UserWarning, match="aux_loss_coeff / z_loss_coeff have no effect with gate='toy'"):
        MoEConfig(gate="toy", aux_loss_coeff=0.01, z_loss_coeff=0.01)
    with pytest.warns(UserWarning, match="fake_gate_noise has no effect with gate='toy'"):
        MoEConfig(gate="toy", fake_gate_noise=0.5)


@pytest.mark.parametrize("name", sorted(GATES))
def test_built_in_gates_do_what_they_declare(name):
    spec = GATES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # declared-idle settings warn; here they are set on purpose
        layer = _layer(
            gate=name,
            aux_loss_coeff=0.01,
            z_loss_coeff=0.001,
            gate_bias_update_factor=0.1 if spec.selection_bias else 0.0,
        )
    layer(torch.randn(2, 5, D))
    assert ("aux_loss" in layer.loss_values) == spec.balancing_probs
    assert ("gate_loss" in layer.loss_values) == spec.own_loss
    assert ("z_loss" in layer.loss_values) == spec.router_logits
    assert callable(getattr(layer.gate, "update_bias", None)) == spec.selection_bias

"""DeepSeek-V3 aux-loss-free bias update: formula, centring, no-op cases, reset, one reduction call."""

import torch

from automoe.config.moe import MoEConfig
from automoe.moe.balance import step_expert_loads, update_gate_biases
from automoe.moe.layer import MoE
from tests.tolerance import assert_equal, rounding_atol

D = 8


def _model(num_layers=2, **kw) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        MoE(
            MoEConfig(
                dim=D, moe_inter_dim=8, num_experts=4, num_activated_experts=2, score_func="sigmoid", **kw
            )
        )
        for _ in range(num_layers)
    )
    for layer in layers:
        layer.init_weights(std=0.5)
    return layers


def _run(model, seed=0):
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(seed))
    for layer in model:
        layer(x)


def test_bias_moves_against_load_by_gamma_sign():
    gamma = 0.01
    model = _model(gate_bias_update_factor=gamma)
    _run(model)
    loads = [layer.expert_load.clone() for layer in model]
    before = [layer.gate.correction_bias.clone() for layer in model]
    returned = update_gate_biases(model)
    for layer, load, b0, (name, got) in zip(model, loads, before, returned.items()):
        assert got.dtype == torch.int64 and torch.equal(got, load), name  # exact counts
        expected = b0 + gamma * torch.sign(load.double().mean() - load).float()
        assert_equal(layer.gate.correction_bias, expected)  # the same elementwise update formula
        assert layer.expert_load.sum() == 0 and layer.step_tokens == 0  # statistics reset


def test_mean_centring_keeps_biases_zero_mean():
    model = _model(gate_bias_update_factor=0.01, bias_update_mean_center=True)
    for step in range(3):
        _run(model, seed=step)
        update_gate_biases(model)
    for layer in model:
        assert layer.gate.correction_bias.abs().sum() > 0
        # zero up to rounding: the centring's E-term mean, then this E-term mean, of biases this large
        bias = layer.gate.correction_bias
        assert abs(bias.mean().item()) < rounding_atol(torch.float32, terms=bias.numel(), depth=2, scale=bias)


def test_no_update_for_gamma_zero_eval_mode_and_frozen_gate():
    for model in (_model(correction_bias=True), _model(gate_bias_update_factor=0.01)):
        _run(model)
        if model[0].cfg.gate_bias_update_factor > 0:
            model.eval()
        update_gate_biases(model)
        for layer in model:
            assert layer.gate.correction_bias.abs().sum() == 0
    frozen = _model(correction_bias=True, train_gate=False)
    _run(frozen)
    update_gate_biases(frozen)
    assert all(layer.gate.correction_bias.abs().sum() == 0 for layer in frozen)


def test_loads_are_reduced_in_one_call_and_the_reduced_load_drives_the_update():
    model = _model(gate_bias_update_factor=1.0)
    _run(model)
    calls = []

    def sum_fn(t):  # pretend a second rank saw the reversed load
        calls.append(t.shape)
        return t + t.flip(-1) * 3

    local = [layer.expert_load.clone() for layer in model]
    update_gate_biases(model, sum_fn=sum_fn)
    assert calls == [torch.Size([2, 4])]
    for layer, load in zip(model, local):
        total = load + load.flip(-1) * 3
        assert_equal(
            layer.gate.correction_bias, torch.sign(total.double().mean() - total).float()
        )  # 0 + 1.0 * sign: exact


def test_bias_is_saved_in_state_dict_and_update_balances_a_skewed_gate():
    model = _model(num_layers=1, gate_bias_update_factor=0.05)
    assert "0.gate.correction_bias" in model.state_dict()
    with torch.no_grad():
        model[0].gate.weight[0] += 1.0  # with positive inputs, expert 0 wins every token
    x = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(1)) + 1.0
    model[0](x)
    first = step_expert_loads(model)["0"]
    update_gate_biases(model)
    for _ in range(60):
        model[0](x)
        last = update_gate_biases(model)["0"]
    imbalance = lambda load: (load.max() / load.double().mean()).item()  # noqa: E731
    assert first[0] == 64 and imbalance(first) > 1.9
    assert imbalance(last) < 1.25

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


# ---- bias_update_rule=adaptive ----


def _set_loads(model, *loads):
    for layer, load in zip(model, loads):
        layer.expert_load.copy_(torch.tensor(load))


def test_adaptive_step_grows_while_the_sign_repeats_halves_on_a_flip_and_is_bounded():
    from automoe.moe.balance import ADAPTIVE_MAX_EXPONENT, ADAPTIVE_MIN_EXPONENT

    gamma = 0.01
    model = _model(num_layers=1, gate_bias_update_factor=gamma, bias_update_rule="adaptive")
    layer = model[0]
    # expert 0 overloaded, 1 underloaded, 2 and 3 exactly at the mean (sign 0: no move, no step change)
    over, flipped = [6, 2, 4, 4], [2, 6, 4, 4]
    want_k, want_b = torch.zeros(4, dtype=torch.int64), torch.zeros(4)
    for load, change in ((over, 0), *[(over, 1)] * 5, (flipped, -4), (flipped, 1)):  # k: 0..5, 1 (halved), 2
        _set_loads(model, load)
        update_gate_biases(model)
        want_k[:2] += change
        sign = torch.sign(torch.tensor(load).sum() - 4 * torch.tensor(load))
        want_b += gamma * torch.exp2(want_k.float() / 4) * sign.float()  # the same fp32 ops: exact
        assert torch.equal(layer.bias_step_exponent, want_k)
        assert torch.equal(layer.bias_last_sign, sign)
        assert_equal(layer.gate.correction_bias, want_b)
    assert layer.gate.correction_bias[2:].abs().sum() == 0
    for _ in range(ADAPTIVE_MAX_EXPONENT + 10):
        _set_loads(model, over)
        update_gate_biases(model)
    assert layer.bias_step_exponent[:2].tolist() == [ADAPTIVE_MAX_EXPONENT] * 2
    assert ADAPTIVE_MIN_EXPONENT == 0  # the floor is gamma: never a smaller step than the sign rule's
    # signs flipping every step (load noise at balance): down to the floor
    for i in range(ADAPTIVE_MAX_EXPONENT):
        _set_loads(model, over if i % 2 else flipped)
        update_gate_biases(model)
    assert layer.bias_step_exponent[:2].tolist() == [ADAPTIVE_MIN_EXPONENT] * 2


def _restored_model_continues_identically(**kw) -> torch.nn.ModuleList:
    """3 steps, a copy restored from the state dict, 3 more steps each: every tensor equal. -> the original."""
    model = _model(**kw)
    for step in range(3):
        _run(model, seed=step)
        update_gate_biases(model)
    restored = _model(**kw)
    restored.load_state_dict(model.state_dict())
    for m in (model, restored):
        for step in range(3, 6):
            _run(m, seed=step)
            update_gate_biases(m)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert_equal(a, b)  # the same ops on the same inputs in one process
    return model


def test_adaptive_state_is_checkpointed_and_a_restored_model_continues_identically():
    model = _restored_model_continues_identically(
        num_layers=2, gate_bias_update_factor=0.01, bias_update_rule="adaptive"
    )
    assert "0.bias_step_exponent" in model.state_dict() and "1.bias_last_sign" in model.state_dict()
    assert "0.bias_step_exponent" not in _model(gate_bias_update_factor=0.01).state_dict()  # sign rule: none
    assert model[0].bias_step_exponent.abs().sum() > 0


def _skewed_gate_imbalance(score_func: str, rule: str, steps: int) -> float:
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(
            dim=D,
            moe_inter_dim=8,
            num_experts=4,
            num_activated_experts=2,
            score_func=score_func,
            gate_bias_update_factor=0.001,  # DeepSeek-V3's gamma
            bias_update_rule=rule,
        )
    )
    layer.init_weights(std=0.5)
    model = torch.nn.ModuleList([layer])
    with torch.no_grad():
        layer.gate.weight[0] += 1.0  # with positive inputs, expert 0 wins every token
    x = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(1)) + 1.0
    loads = []
    for _ in range(steps):
        layer(x)
        loads.append(update_gate_biases(model)["0"].double())
    last = torch.stack(loads[-10:]).mean(0)  # the last 10 steps' mean load
    return (last.max() / last.mean()).item() - 1


def test_adaptive_rule_balances_softmax_and_sigmoid_gates_with_the_default_gamma():
    # gamma = 0.001 moves a sign-rule bias by 0.06 in 60 steps: not enough to undo a skew of this size in either
    # score scale; the adaptive step grows to what each scale needs
    for score_func in ("softmax", "sigmoid"):
        assert _skewed_gate_imbalance(score_func, "sign", 60) > 0.5, score_func
        assert _skewed_gate_imbalance(score_func, "adaptive", 60) < 0.1, score_func


def test_adaptive_rule_is_validated_and_idle_without_gamma():
    import pytest

    with pytest.raises(ValueError, match="bias_update_rule"):
        MoEConfig(bias_update_rule="proportional")
    with pytest.warns(UserWarning, match="bias_update_rule='adaptive' has no effect"):
        MoEConfig(bias_update_rule="adaptive", correction_bias=True)


# ---- bias_update_drift ----


def test_drift_term_adds_the_velocity_then_accumulates_kappa_times_the_update():
    gamma, kappa = 0.01, 0.25
    for rule in ("sign", "adaptive"):
        model = _model(
            num_layers=1, gate_bias_update_factor=gamma, bias_update_rule=rule, bias_update_drift=kappa
        )
        plain = _model(num_layers=1, gate_bias_update_factor=gamma, bias_update_rule=rule)
        layer, ref = model[0], plain[0]  # ref: the same rule without the drift term
        want_v, want_b = torch.zeros(4), torch.zeros(4)
        for load in ([6, 2, 4, 4], [6, 2, 4, 4], [5, 3, 4, 4], [2, 6, 4, 4]):
            _set_loads(model, load)
            _set_loads(plain, load)
            update_gate_biases(model)
            update_gate_biases(plain)
            sign = torch.sign(torch.tensor(load).sum() - 4 * torch.tensor(load)).float()
            step = gamma * sign  # the rule's own update; the adaptive rule's step from a twin without drift:
            if rule == "adaptive":
                step = gamma * torch.exp2(ref.bias_step_exponent.float() / 4) * sign
            want_b += step + want_v  # the same fp32 ops in the same order: exact
            want_v += kappa * step
            assert_equal(layer.bias_velocity, want_v, msg=rule)
            assert_equal(layer.gate.correction_bias, want_b, msg=rule)
        assert layer.bias_velocity[:2].abs().min() > 0 and layer.bias_velocity[2:].abs().sum() == 0


def test_drift_velocity_is_checkpointed_stays_fp32_and_a_restored_model_continues_identically():
    model = _restored_model_continues_identically(
        num_layers=2, gate_bias_update_factor=0.01, bias_update_drift=0.05
    )
    assert "0.bias_velocity" not in _model(gate_bias_update_factor=0.01).state_dict()  # no drift: no state
    velocity = model[0].bias_velocity.clone()
    assert velocity.abs().sum() > 0
    model.to(torch.bfloat16)  # a bf16 model keeps its bias state fp32, unrounded
    assert model[0].bias_velocity.dtype == torch.float32 and torch.equal(model[0].bias_velocity, velocity)
    assert model[0].gate.correction_bias.dtype == torch.float32


def _drifting_router_lag(drift: float, steps: int = 300, rate: float = 5e-3) -> float:
    """A router whose expert-0 score rises by `rate` every step (a steady drift, added to its correction bias),
    balanced by the sign rule with gamma = 1e-3 (+ the drift term): the mean over the last 100 steps of expert 0's
    load share above the mean."""
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(
            dim=D,
            moe_inter_dim=8,
            num_experts=4,
            num_activated_experts=1,
            score_func="sigmoid",
            gate_bias_update_factor=1e-3,
            bias_update_drift=drift,
        )
    )
    layer.init_weights(std=0.5)
    model = torch.nn.ModuleList([layer])
    x = torch.randn(1, 512, D, generator=torch.Generator().manual_seed(1))
    push = torch.tensor([rate, 0.0, 0.0, 0.0])
    excess = []
    for step in range(steps):
        layer.gate.update_bias(push)  # what the router's own drift does to expert 0's selection score
        layer(x)
        load = update_gate_biases(model)["0"].double()
        if step >= steps - 100:
            excess.append(load[0].item() / load.mean().item() - 1)
    return sum(excess) / len(excess)


def test_drift_term_removes_the_sign_rules_lag_behind_a_steadily_drifting_router():
    # the sign rule moves a bias by at most gamma a step, so a router drifting 5x faster leaves it ever further
    # behind; the velocity (kappa = 0.02: 0.02 * gamma per step of the same sign) learns the drift and keeps up
    lag_sign, lag_drift = _drifting_router_lag(0.0), _drifting_router_lag(0.02)
    assert lag_sign > 2.0  # expert 0 takes over 3x its share (all tokens: 3.0)
    assert abs(lag_drift) < 0.1, (lag_sign, lag_drift)


def test_bias_update_drift_is_validated_and_idle_without_gamma():
    import pytest

    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="bias_update_drift"):
            MoEConfig(bias_update_drift=bad, gate_bias_update_factor=0.001)
    with pytest.warns(UserWarning, match="bias_update_drift=0.02 has no effect"):
        MoEConfig(bias_update_drift=0.02, correction_bias=True)

"""FakeBalancedGate: exact round-robin balance at noise 0, distinct experts, skip respected, noise adds imbalance."""

from __future__ import annotations

import pytest
import torch

from automoe.config.moe import MoEConfig
from automoe.moe.gates import FakeBalancedGate
from tests.tolerance import assert_close_rounding, assert_equal, rounding_atol


def make(
    noise: float = 0.0, skip: int = 0, E: int = 8, K: int = 2, route_scale: float = 1.0
) -> FakeBalancedGate:
    cfg = MoEConfig(
        dim=16,
        num_experts=E,
        num_activated_experts=K,
        gate="fake_balanced",
        fake_gate_noise=noise,
        fake_gate_skip_first_n_experts=skip,
        route_scale=route_scale,
    )
    return FakeBalancedGate(cfg)


def load(indices_TK: torch.Tensor, E: int) -> torch.Tensor:
    return torch.bincount(indices_TK.reshape(-1), minlength=E)


def assert_distinct_and_allowed(indices_TK: torch.Tensor, skip: int, E: int) -> None:
    sorted_TK = indices_TK.sort(-1).values
    assert (sorted_TK[:, 1:] > sorted_TK[:, :-1]).all()
    assert indices_TK.min() >= skip and indices_TK.max() < E


def test_has_no_parameters_and_ignores_values():
    gate = make()
    assert list(gate.parameters()) == [] and list(gate.buffers()) == []
    a = gate(torch.randn(10, 16), None)
    b = gate(torch.randn(10, 16) * 100, None)
    assert torch.equal(a.indices_TK, b.indices_TK)
    assert_equal(a.weights_TK, b.weights_TK)  # constants 1/K, whatever the input
    assert a.probs_TE is None and a.gate_loss is None


@pytest.mark.parametrize("skip", [0, 2, 5])
def test_noise0_is_round_robin_and_exactly_balanced(skip):
    E, K = 8, 3
    A = E - skip
    T = 4 * A  # T*K divisible by A
    out = make(skip=skip, E=E, K=K)(torch.randn(T, 16), None)
    ref = torch.tensor([[skip + (t * K + k) % A for k in range(K)] for t in range(T)])
    assert torch.equal(out.indices_TK, ref)
    assert out.indices_TK.dtype == torch.int64
    expected = torch.tensor([0] * skip + [T * K // A] * A)
    assert torch.equal(load(out.indices_TK, E), expected)
    assert_distinct_and_allowed(out.indices_TK, skip, E)
    assert_equal(out.weights_TK, torch.full((T, K), 1.0 / K))  # the same constant fill


def test_padding_does_not_unbalance_valid_tokens():
    E, K, T = 8, 2, 40
    valid = torch.ones(T, dtype=torch.bool)
    valid[torch.tensor([1, 2, 7, 20, 21, 22, 23, 30])] = False  # 32 valid tokens -> 64 slots, 8 per expert
    out = make(E=E, K=K)(torch.randn(T, 16), valid)
    assert torch.equal(load(out.indices_TK[valid], E), torch.full((E,), 8))


def test_weights_dtype_and_route_scale():
    out = make(route_scale=2.5, K=4)(torch.randn(6, 16, dtype=torch.bfloat16), None)
    assert out.weights_TK.dtype == torch.bfloat16
    assert_equal(out.weights_TK, torch.full((6, 4), 2.5 / 4, dtype=torch.bfloat16))  # 0.625: exact in bf16


@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_noise_keeps_distinct_allowed_experts_and_normalized_weights(noise):
    torch.manual_seed(0)
    E, K, skip = 8, 3, 2
    out = make(noise=noise, skip=skip, E=E, K=K)(torch.randn(512, 16), None)
    assert_distinct_and_allowed(out.indices_TK, skip, E)
    # a K-term softmax mixed with 1/K, then summed over the K slots: two K-term reductions of values <= 1
    assert_close_rounding(out.weights_TK.sum(-1), torch.ones(512), terms=K, depth=2)
    assert (out.weights_TK > 0).all()
    uniform_rows = (out.weights_TK == 1.0 / K).all(-1)
    assert not uniform_rows.any()  # every row's weights are perturbed
    lo, hi = (1 - noise) / K, (1 - noise) / K + noise
    tol = rounding_atol(torch.float32, terms=K, scale=1.0)  # the K-term softmax's rounding, values <= 1
    assert (out.weights_TK >= lo - tol).all() and (out.weights_TK <= hi + tol).all()


def test_noise1_is_random_and_noise_fraction_of_tokens_leave_round_robin():
    E, K, T = 8, 2, 4000
    round_robin = make(E=E, K=K)(torch.randn(T, 16), None).indices_TK
    torch.manual_seed(1)
    moved = (make(noise=0.5, E=E, K=K)(torch.randn(T, 16), None).indices_TK != round_robin).any(-1)
    # a token drawn at random keeps its round-robin pair with probability 1/28 (pairs of 8)
    expected = 0.5 * (1 - 1 / 28)
    # Monte Carlo: a fraction of T = 4000 tokens has std sqrt(0.25 / 4000) = 0.008: 0.03 is ~4 sigma
    assert abs(moved.float().mean().item() - expected) < 0.03
    torch.manual_seed(2)
    rand = make(noise=1.0, E=E, K=K)(torch.randn(T, 16), None).indices_TK
    freq = load(rand, E).float() / (T * K)
    # uniform over experts in expectation; Monte Carlo over T*K = 8000 slots: std sqrt(1/8 * 7/8 / 8000) = 0.0037,
    # so 0.015 is ~4 sigma
    assert (freq - 1 / E).abs().max() < 0.015


def test_imbalance_grows_with_noise():
    E, K, T = 8, 2, 2048

    def cv(noise: float) -> float:
        vals = []
        for seed in range(4):
            torch.manual_seed(seed)
            load_E = load(make(noise=noise, E=E, K=K)(torch.randn(T, 16), None).indices_TK, E).float()
            vals.append((load_E.std() / load_E.mean()).item())
        return sum(vals) / len(vals)

    cvs = [cv(n) for n in (0.0, 0.1, 0.5, 1.0)]
    assert cvs[0] == 0.0
    assert cvs[0] < cvs[1] < cvs[2] < cvs[3], cvs

"""HybridGate (seed 003): the learned soft + sparse + memory-key mixture vs a hand-written reference.

Letters: T tokens, D model dim, E experts, K slots of the sparse part.
"""

from __future__ import annotations

import math

import pytest
import torch

from automoe.config.moe import MoEConfig
from automoe.moe.gates import HybridGate
from tests.tolerance import assert_close_rounding

T, D, E, K = 20, 16, 6, 2


def make(seed: int = 0, **overrides) -> HybridGate:
    gate = HybridGate(MoEConfig(dim=D, num_experts=E, num_activated_experts=K, gate="hybrid", **overrides))
    torch.manual_seed(seed)
    gate.init_weights(std=0.3)
    return gate


def reference(gate: HybridGate, x_TD: torch.Tensor) -> torch.Tensor:
    """Per token, written with loops and -inf masking instead of scatter."""
    b_soft = gate.b_soft if gate.b_soft is not None else torch.zeros(E)
    b_sparse = gate.b_sparse if gate.b_sparse is not None else torch.zeros(E)
    mix = torch.exp(gate.mix_logits) / torch.exp(gate.mix_logits).sum()
    rows = []
    for x_D in x_TD:
        soft = torch.softmax(gate.w_soft @ x_D + b_soft, dim=0)
        sparse_logits = gate.w_sparse @ x_D + b_sparse
        kth = sparse_logits.sort(descending=True).values[K - 1]
        sparse = torch.softmax(sparse_logits.masked_fill(sparse_logits < kth, float("-inf")), dim=0)
        memory = torch.softmax((gate.memory_keys @ x_D) / math.sqrt(D), dim=0)
        rows.append(mix[0] * soft + mix[1] * sparse + mix[2] * memory)
    return torch.stack(rows)


@pytest.mark.parametrize("router_bias", [False, True], ids=["no-bias", "bias"])
def test_matches_reference(router_bias):
    gate = make(router_bias=router_bias, route_scale=1.5)
    with torch.no_grad():
        gate.mix_logits.normal_()  # away from the initial mix
        if router_bias:
            gate.b_soft.normal_()
            gate.b_sparse.normal_()
    x = torch.randn(T, D)
    out = gate(x, None)
    ref = reference(gate, x)
    # per-token matvecs over D vs batched linears, then softmaxes over E, then the 3-way mix: 3 stages of <= D terms
    assert_close_rounding(out.probs_TE, ref, terms=D, depth=3)
    assert_close_rounding(out.weights_TK, 1.5 * ref, terms=D, depth=3)
    # each part sums to 1 over E (softmax denominators), mixed, summed again over E: 3 stages of E terms
    assert_close_rounding(out.weights_TK.sum(-1), torch.full((T,), 1.5), terms=E, depth=3)
    assert torch.equal(out.indices_TK, torch.arange(E).expand(T, E))
    assert out.indices_TK.dtype == torch.int64
    assert gate.top_k == E and gate.num_experts == E
    b = gate.b_soft if router_bias else 0.0
    assert_close_rounding(out.logits_TE, x @ gate.w_soft.T + b, terms=D + 1)  # fused addmm vs mm then + bias


def test_initial_mix_reproduces_seed_003():
    """Seed 003: final = (alpha*sparse + (1-alpha)*soft + memory) / 2 with alpha = 0.5 (memory via keys [E, D])."""
    gate = make()
    x = torch.randn(T, D)
    soft = torch.softmax(x @ gate.w_soft.T, -1)
    logits = x @ gate.w_sparse.T
    top_v, top_i = logits.topk(K, -1)
    sparse = torch.zeros_like(logits).scatter(-1, top_i, torch.softmax(top_v, -1))
    memory = torch.softmax(x @ gate.memory_keys.T / math.sqrt(D), -1)
    seed = (0.5 * sparse + 0.5 * soft + memory) / 2
    # the same three linears over D and softmaxes over E, mixed in another order (weights 0.25/0.25/0.5 vs
    # the fixed formula): 3 stages of <= D terms
    assert_close_rounding(gate(x, None).probs_TE, seed, terms=D, depth=3)


def test_gradient_reaches_all_three_parts_and_the_mix():
    gate = make(router_bias=True)
    out = gate(torch.randn(T, D), None)
    (out.weights_TK * torch.randn(T, E)).sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_train_gate_false_and_dtypes():
    gate = make(train_gate=False)
    assert not any(p.requires_grad for p in gate.parameters())
    out = gate(torch.randn(T, D, dtype=torch.bfloat16), None)
    assert out.weights_TK.dtype == torch.bfloat16 and out.probs_TE.dtype == torch.float32
    bf16 = make(router_dtype="bfloat16")(torch.randn(T, D, dtype=torch.bfloat16), None)
    assert bf16.probs_TE.dtype == torch.bfloat16

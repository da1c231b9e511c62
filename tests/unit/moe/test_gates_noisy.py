"""NoisyTopKGate (Shazeer et al. 2017): load estimator vs its definition and Monte-Carlo, the cv² loss vs a
hand-written reference, gradient to the noise weights, deterministic eval, padding left out of the loss.

Letters: T tokens, D model dim, E experts, K slots per token, R Monte-Carlo repeats.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from automoe.config.moe import MoEConfig
from automoe.moe.gates import NoisyTopKGate, cv_squared, prob_in_top_k
from tests.tolerance import assert_close_rounding, assert_equal, rounding_atol

D, E, K = 16, 6, 2


def make(coeff: float = 0.1, seed: int = 0, **overrides) -> NoisyTopKGate:
    gate = NoisyTopKGate(
        MoEConfig(
            dim=D,
            num_experts=E,
            num_activated_experts=K,
            gate="noisy_topk",
            aux_loss_coeff=coeff,
            **overrides,
        )
    )
    torch.manual_seed(seed)
    gate.init_weights(std=0.3)
    with torch.no_grad():
        gate.w_noise.normal_(0, 0.3)  # per-token noise scales, not the uniform softplus(0) of the init
    return gate


def reference_prob_in_top_k(clean_TE, noisy_TE, std_TE, k):
    """By definition: expert e stays in the top k iff clean_e + n·std_e beats the k-th largest OTHER noisy logit."""
    T, E = clean_TE.shape
    out = torch.empty(T, E)
    for e in range(E):
        others = torch.cat([noisy_TE[:, :e], noisy_TE[:, e + 1 :]], dim=1)
        threshold_T = others.topk(k, dim=-1).values[:, -1]
        z_T = (clean_TE[:, e] - threshold_T) / std_TE[:, e]
        out[:, e] = 0.5 * (1 + torch.erf(z_T / math.sqrt(2)))  # standard normal CDF
    return out


def reference_loss(gate, x_TD, valid_T, noise_TE, coeff):
    """Shazeer's gate written out: noisy logits, keep top-k (-inf elsewhere), softmax, cv² of importance and load."""
    clean = x_TD @ gate.w_gate.T
    std = F.softplus(x_TD @ gate.w_noise.T) + 1e-2
    noisy = clean + noise_TE * std
    kth = noisy.topk(K, dim=-1).values[:, -1:]
    gates_TE = torch.softmax(noisy.masked_fill(noisy < kth, float("-inf")), dim=-1)
    load_TE = reference_prob_in_top_k(clean, noisy, std, K)
    v = valid_T.float().unsqueeze(1)
    importance, load = (gates_TE * v).sum(0), (load_TE * v).sum(0)

    def cv2(t):
        return t.var(unbiased=True) / (t.mean() ** 2 + 1e-10)

    return coeff * (cv2(importance) + cv2(load)), gates_TE


def test_prob_in_top_k_matches_definition():
    g = torch.Generator().manual_seed(0)
    clean, std = torch.randn(50, E, generator=g), torch.rand(50, E, generator=g) + 0.1
    noisy = clean + torch.randn(50, E, generator=g) * std
    top = noisy.topk(K + 1, dim=-1).values
    got = prob_in_top_k(clean, noisy, std, top, k=K)
    # ndtr vs 0.5 * (1 + erf(z / sqrt 2)): no reduction, a chain of 6 elementwise roundings (subtract, divide,
    # / sqrt 2, erf, 1 +, * 0.5) on probabilities <= 1, counted as terms
    assert_close_rounding(got, reference_prob_in_top_k(clean, noisy, std, K), terms=6, scale=1.0)


def test_load_estimate_matches_monte_carlo():
    """Averaged over noise draws the estimator equals the probability of being in the top k (seeded, loose)."""
    g = torch.Generator().manual_seed(1)
    R = 20000
    clean = torch.randn(1, E, generator=g).expand(R, E)
    std = (torch.rand(1, E, generator=g) + 0.5).expand(R, E)
    noisy = clean + torch.randn(R, E, generator=g) * std
    top_vals, top_idx = noisy.topk(K + 1, dim=-1)
    estimate_E = prob_in_top_k(clean, noisy, std, top_vals, k=K).mean(0)
    empirical_E = torch.zeros(R, E).scatter(1, top_idx[:, :K], 1.0).mean(0)
    # Monte Carlo, not rounding: a mean of R = 20000 draws of a [0, 1] quantity has std <= 0.5 / sqrt(R) = 0.0035,
    # so 0.02 is ~6 sigma (seeded, so deterministic; the margin is for other generators' streams)
    assert (estimate_E - empirical_E).abs().max() < 0.02, (estimate_E, empirical_E)
    assert empirical_E.max() - empirical_E.min() > 0.1  # the experts really differ
    # E[sum_e P(e in top k | others)] = K; the sum of E = 6 such means has std <= 6 * 0.0035: 0.03 is ~1.4 of
    # that worst case and ~8 sigma of the measured spread of the row sums (about 0.5)
    torch.testing.assert_close(estimate_E.sum(), torch.tensor(float(K)), rtol=0, atol=0.03)


def test_load_estimate_is_the_conditional_probability():
    """Keep the other experts' noise, redraw only expert e's: the top-k frequency matches the estimate."""
    g = torch.Generator().manual_seed(2)
    clean, std = torch.randn(1, E, generator=g), torch.rand(1, E, generator=g) + 0.5
    noisy = clean + torch.randn(1, E, generator=g) * std
    top = noisy.topk(K + 1, dim=-1).values
    estimate = prob_in_top_k(clean, noisy, std, top, k=K)[0]
    R = 20000
    for e in range(E):
        redrawn = noisy.expand(R, E).clone()
        redrawn[:, e] = clean[0, e] + torch.randn(R, generator=g) * std[0, e]
        freq = (redrawn.topk(K, dim=-1).indices == e).any(-1).float().mean()
        # Monte Carlo: a frequency over R = 20000 draws has std <= 0.5 / sqrt(R) = 0.0035: 0.015 is ~4 sigma
        assert abs(freq - estimate[e]) < 0.015, (e, freq, estimate[e])


def test_training_forward_matches_reference():
    gate = make(coeff=0.3).train()
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(3))
    valid = torch.rand(40, generator=torch.Generator().manual_seed(4)) > 0.2
    torch.manual_seed(123)
    out = gate(x, valid)
    torch.manual_seed(123)
    noise = torch.randn(40, E)  # the same draw the gate made
    ref_loss, ref_gates_TE = reference_loss(gate, x, valid, noise, 0.3)
    # loss: logits over D, then per-expert sums over the T = 40 tokens, then cv² over E: 3 chained reductions
    assert_close_rounding(out.gate_loss, ref_loss, terms=40, depth=3)
    # gates: logits over D = 16, then a softmax over the K kept values vs over all E (masked): 2 stages
    assert_close_rounding(out.weights_TK, ref_gates_TE.gather(1, out.indices_TK), terms=D, depth=2)
    # we picked the top k: else a kept gate of the reference is 0 and the sum drops by a whole gate (>> rounding
    # of its E-term softmax denominator plus this K-term sum)
    assert (
        ref_gates_TE.gather(1, out.indices_TK).sum(-1)
        > 1 - rounding_atol(torch.float32, terms=E + K, scale=1.0)
    ).all()
    clean = x @ gate.w_gate.T
    assert_close_rounding(out.logits_TE, clean, terms=D)  # F.linear vs matmul: one D-term contraction
    assert_close_rounding(out.probs_TE, torch.softmax(clean, -1), terms=D, depth=2)  # + the E-term softmax


def test_gradient_reaches_w_noise_and_w_gate():
    gate = make().train()
    gate(torch.randn(32, D), None).gate_loss.backward()
    assert gate.w_noise.grad.abs().sum() > 0 and gate.w_gate.grad.abs().sum() > 0


def test_zero_init_noise_gets_gradient():
    gate = NoisyTopKGate(
        MoEConfig(dim=D, num_experts=E, num_activated_experts=K, gate="noisy_topk", aux_loss_coeff=0.1)
    ).train()
    torch.manual_seed(0)  # this test's own draws, whatever ran before
    gate.init_weights()
    assert_equal(gate.w_noise, torch.zeros(E, D))
    gate(torch.randn(32, D), None).gate_loss.backward()
    assert gate.w_noise.grad.abs().sum() > 0


def test_eval_is_deterministic_noise_free_and_counts_load():
    gate = make(coeff=0.2).eval()
    x = torch.randn(30, D)
    rng = torch.get_rng_state()
    a, b = gate(x, None), gate(x, None)
    assert torch.equal(torch.get_rng_state(), rng)  # no noise drawn
    assert torch.equal(a.indices_TK, b.indices_TK)
    assert_equal(a.weights_TK, b.weights_TK)  # the same computation twice
    clean = x @ gate.w_gate.T
    top_v, top_i = clean.topk(K, dim=-1)
    assert torch.equal(a.indices_TK, top_i)
    # F.linear vs matmul over D, then the same K-term softmax: 2 stages
    assert_close_rounding(a.weights_TK, torch.softmax(top_v, -1), terms=D, depth=2)
    importance = torch.zeros(30, E).scatter(1, top_i, torch.softmax(top_v, -1)).sum(0)
    count = torch.bincount(top_i.reshape(-1), minlength=E).float()
    ref = 0.2 * (importance.var() / importance.mean() ** 2 + count.var() / count.mean() ** 2)
    # logits over D, softmax, per-expert sums over the T = 30 tokens, cv² over E: 3 chained reductions of <= 30
    assert_close_rounding(a.gate_loss, ref, terms=30, depth=3)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padding_is_excluded_from_the_loss(mode):
    gate = make().train(mode == "train")
    x = torch.randn(24, D)
    valid = torch.ones(24, dtype=torch.bool)
    valid[-7:] = False
    garbage = x.clone()
    garbage[~valid] = torch.randn(7, D) * 50
    torch.manual_seed(5)
    a = gate(x, valid).gate_loss
    torch.manual_seed(5)
    b = gate(garbage, valid).gate_loss
    assert_equal(a, b)  # same shapes and kernels; padded rows enter every sum as exact zeros
    torch.manual_seed(5)
    assert not torch.equal(gate(garbage, None).gate_loss, a)  # padding would change it if counted


def test_no_loss_when_coeff_zero_and_route_scale_and_dtypes():
    out = make(coeff=0.0, route_scale=2.0).eval()(torch.randn(8, D, dtype=torch.bfloat16), None)
    assert out.gate_loss is None
    assert out.weights_TK.dtype == torch.bfloat16 and out.indices_TK.dtype == torch.int64
    assert out.logits_TE.dtype == torch.float32
    # bf16 weights: each of the K slots rounded to bf16, summing to route_scale = 2 (a dtype bound, not fp32's)
    bf16_atol = rounding_atol(torch.bfloat16, terms=K, scale=2.0)
    torch.testing.assert_close(out.weights_TK.float().sum(-1), torch.full((8,), 2.0), rtol=0, atol=bf16_atol)


def test_all_experts_active_uses_counts():
    gate = NoisyTopKGate(MoEConfig(dim=D, num_experts=3, num_activated_experts=3, aux_loss_coeff=1.0))
    torch.manual_seed(0)  # this test's own draws, whatever ran before
    gate.init_weights()
    out = gate.train()(torch.randn(5, D), None)
    assert sorted(out.indices_TK[0].tolist()) == [0, 1, 2]
    assert torch.isfinite(out.gate_loss)


def test_train_gate_false_freezes_both_weights():
    gate = make(train_gate=False)
    assert not gate.w_gate.requires_grad and not gate.w_noise.requires_grad
    assert not gate.train()(torch.randn(4, D), None).gate_loss.requires_grad


def test_cv_squared():
    assert cv_squared(torch.tensor([3.0])).item() == 0.0
    assert cv_squared(torch.zeros(4)).item() == 0.0
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    ref = torch.tensor(x.numpy().var(ddof=1) / x.numpy().mean() ** 2, dtype=torch.float32)
    assert_close_rounding(cv_squared(x), ref, terms=4, depth=2)  # numpy's mean, then its 4-term variance

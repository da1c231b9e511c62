"""TopKGate against hand-written references of the HF Mixtral / Qwen3-MoE / DeepSeek-V2/V3 / GPT-OSS routers,
plus build_gate, router dtype, router bias, frozen gates and meta-device materialization for every gate.

Letters: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automoe.config.moe import MoEConfig
from automoe.moe.gates import FakeBalancedGate, HybridGate, NoisyTopKGate, TopKGate, build_gate
from tests.tolerance import assert_close_rounding, assert_equal

T, D = 64, 32


def make_gate(std: float = 0.5, seed: int = 0, **overrides) -> TopKGate:
    cfg = MoEConfig(dim=D, **overrides)
    gate = TopKGate(cfg)
    torch.manual_seed(seed)
    gate.init_weights(std=std)  # wide logits so top-k choices are well separated
    return gate


def inputs(seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def canonical(indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots sorted by expert id: routing is a set of (expert, weight) pairs, slot order is arbitrary."""
    sorted_TK, perm_TK = indices_TK.sort(dim=-1)
    return sorted_TK, weights_TK.gather(1, perm_TK)


# ---------- hand-written references: the HF transformers routers (fp32 path) ----------


def hf_mixtral(x, w, top_k):
    """MixtralSparseMoeBlock: softmax(fp32) over E -> topk -> renormalize -> cast."""
    router_logits = F.linear(x, w)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights.to(x.dtype), selected_experts


def hf_qwen3_moe(x, w, top_k, norm_topk_prob):
    """Qwen3MoeSparseMoeBlock: like Mixtral, renormalization optional."""
    router_logits = F.linear(x, w)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    if norm_topk_prob:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights.to(x.dtype), selected_experts


def hf_deepseek_v3(x, w, bias, *, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor):
    """DeepseekV3TopkRouter + get_topk_indices."""
    E = w.shape[0]
    router_logits = F.linear(x.type(torch.float32), w.type(torch.float32))
    scores = router_logits.sigmoid()
    scores_for_choice = scores.view(-1, E) + bias.unsqueeze(0)
    group_scores = scores_for_choice.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
    topk_indices = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_indices, scores


def hf_deepseek_v2_group_limited(x, w, *, n_group, topk_group, top_k, routed_scaling_factor):
    """DeepseekV2MoEGate, topk_method='group_limited_greedy' (softmax, group score = max)."""
    bsz_seq, E = x.shape[0], w.shape[0]
    scores = F.linear(x.type(torch.float32), w.type(torch.float32)).softmax(dim=-1, dtype=torch.float32)
    group_scores = scores.view(bsz_seq, n_group, -1).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(bsz_seq, n_group, E // n_group).reshape(bsz_seq, -1)
    tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
    topk_weight, topk_idx = torch.topk(tmp_scores, k=top_k, dim=-1, sorted=False)
    return topk_weight * routed_scaling_factor, topk_idx


def hf_gpt_oss(x, w, b, top_k):
    """GptOssTopKRouter: linear with bias, topk on logits, softmax over the K."""
    router_logits = F.linear(x, w, b)
    router_top_value, router_indices = torch.topk(router_logits, top_k, dim=-1)
    router_top_value = F.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    return router_top_value, router_indices, router_logits


# ---------- model parity ----------


def test_mixtral_bitwise():
    gate = make_gate(num_experts=8, num_activated_experts=2, norm_topk_prob=True)
    x = inputs()
    out = gate(x, None)
    ref_w, ref_i = hf_mixtral(x, gate.weight, 2)
    # bitwise by construction: the reference runs the same ops in the same order on the same shapes
    assert torch.equal(out.indices_TK, ref_i)
    assert_equal(out.weights_TK, ref_w)
    assert out.indices_TK.dtype == torch.int64
    assert_equal(out.logits_TE, F.linear(x, gate.weight))
    assert_equal(out.probs_TE, F.softmax(F.linear(x, gate.weight), dim=-1))
    assert out.gate_loss is None


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
def test_qwen3_moe_bitwise(norm):
    gate = make_gate(num_experts=16, num_activated_experts=4, norm_topk_prob=norm)
    x = inputs()
    out = gate(x, None)
    ref_w, ref_i = hf_qwen3_moe(x, gate.weight, 4, norm)
    assert torch.equal(out.indices_TK, ref_i)
    assert_equal(out.weights_TK, ref_w)  # same ops, same order, same shapes


def test_topk_then_softmax_matches_mixtral():
    """softmax_before_topk=False: same experts as Mixtral, weights equal up to op order.

    softmax over the K logits vs softmax over E then divide by the K sum are the same function
    evaluated in a different order: rounding apart.
    """
    gate = make_gate(num_experts=8, num_activated_experts=2, softmax_before_topk=False)
    x = inputs()
    out = gate(x, None)
    ref_w, ref_i = hf_mixtral(x, gate.weight, 2)
    assert torch.equal(out.indices_TK, ref_i)
    # the reference's chain: a softmax denominator over E = 8, then the K-term renormalization: depth 2
    assert_close_rounding(out.weights_TK, ref_w, terms=8, depth=2)
    assert not torch.equal(out.weights_TK.sum(-1), torch.zeros(T))
    assert_equal(out.probs_TE, F.softmax(out.logits_TE, dim=-1))  # the same softmax on the same logits


def test_gpt_oss_bitwise():
    gate = make_gate(num_experts=8, num_activated_experts=4, softmax_before_topk=False, router_bias=True)
    with torch.no_grad():
        gate.bias.normal_(0, 1.0)
    x = inputs()
    out = gate(x, None)
    ref_w, ref_i, ref_logits = hf_gpt_oss(x, gate.weight, gate.bias, 4)
    assert torch.equal(out.indices_TK, ref_i)
    assert_equal(out.weights_TK, ref_w)  # same ops, same order, same shapes
    assert_equal(out.logits_TE, ref_logits)
    # the bias really moved the choice
    assert not torch.equal(F.linear(x, gate.weight).topk(4).indices, ref_i)


@pytest.mark.parametrize("groups", [(8, 4), (1, 1)], ids=["g8-kept4", "g1"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepseek_v3(groups, seed):
    """Same experts as HF DeepSeek-V3 for every token; weights equal up to the renormalization's sum order.

    HF takes topk(sorted=False) (implementation-defined slot order, which on CPU even depends on the
    value filled into dropped groups) while we sort, so the K-term denominator is summed in another
    order: rounding apart.
    """
    n_group, topk_group = groups
    E, K = 32, 8
    gate = make_gate(
        seed=seed,
        num_experts=E,
        num_activated_experts=K,
        score_func="sigmoid",
        correction_bias=True,
        num_expert_groups=n_group,
        num_limited_groups=topk_group,
        norm_topk_prob=True,
        route_scale=2.5,
    )
    with torch.no_grad():
        gate.correction_bias.uniform_(-0.05, 0.05)
    x = inputs(seed=10 + seed)
    out = gate(x, None)
    ref_w, ref_i, scores = hf_deepseek_v3(
        x,
        gate.weight,
        gate.correction_bias,
        n_group=n_group,
        topk_group=topk_group,
        top_k=K,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    idx, w = canonical(out.indices_TK, out.weights_TK)
    ref_idx, ref_w = canonical(ref_i, ref_w)
    assert torch.equal(idx, ref_idx)
    assert_close_rounding(w, ref_w, terms=K)  # one K-term denominator summed in another slot order
    assert_equal(out.probs_TE, scores / scores.sum(-1, keepdim=True))  # same ops on the same scores
    # our slots are sorted by biased score, so the weights are a plain gather in that order: bitwise
    unnorm = scores.gather(1, out.indices_TK)
    assert_equal(out.weights_TK, unnorm / (unnorm.sum(-1, keepdim=True) + 1e-20) * 2.5)
    if n_group > 1:  # group limiting excluded experts the plain top-k would have taken
        plain = (scores + gate.correction_bias).topk(K).indices.sort(-1).values
        assert not torch.equal(plain, idx)


def test_dropped_groups_never_win_over_negative_biased_scores():
    """With -inf masking a kept group's expert beats any dropped one even when its biased score is < 0
    (HF's 0.0 fill would pick a dropped expert here)."""
    E = 8
    gate = TopKGate(
        MoEConfig(
            dim=E,
            num_experts=E,
            num_activated_experts=3,
            score_func="sigmoid",
            correction_bias=True,
            num_expert_groups=2,
            num_limited_groups=1,
        )
    )
    gate.init_weights()
    with torch.no_grad():
        gate.weight.copy_(torch.eye(E))
        gate.correction_bias.copy_(torch.tensor([0.0, 0.0, -0.9, -0.9, -0.9, -0.9, -0.9, -0.9]))
    x = torch.tensor([[4.0, 4.0, 0.0, 0.0, -4.0, -4.0, -4.0, -4.0]])  # group 0 wins; 2 and 3 biased < 0
    out = gate(x, None)
    assert set(out.indices_TK[0].tolist()) in ({0, 1, 2}, {0, 1, 3})


def test_deepseek_v2_group_limited_softmax():
    gate = make_gate(
        num_experts=16, num_activated_experts=3, num_expert_groups=4, num_limited_groups=2, route_scale=1.5
    )
    x = inputs()
    out = gate(x, None)
    ref_w, ref_i = hf_deepseek_v2_group_limited(
        x, gate.weight, n_group=4, topk_group=2, top_k=3, routed_scaling_factor=1.5
    )
    idx, w = canonical(out.indices_TK, out.weights_TK)
    ref_idx, ref_w = canonical(ref_i, ref_w)
    assert torch.equal(idx, ref_idx)
    assert_equal(w, ref_w)  # no sum involved: gathered probabilities times the scale, bitwise


def test_correction_bias_selects_but_does_not_weigh():
    gate = make_gate(num_experts=8, num_activated_experts=2, correction_bias=True)
    with torch.no_grad():
        gate.correction_bias[5] = 10.0  # forces expert 5 into every token's top-k
    x = inputs()
    out = gate(x, None)
    probs = F.softmax(F.linear(x, gate.weight), dim=-1)
    assert (out.indices_TK == 5).any(-1).all()
    assert_equal(out.weights_TK, probs.gather(1, out.indices_TK))  # same linear + softmax, then a gather
    ref_i = (probs + gate.correction_bias).topk(2).indices
    assert torch.equal(out.indices_TK, ref_i)


def test_correction_bias_buffer_is_fp32_persistent_and_implied_by_update_factor():
    gate = TopKGate(MoEConfig(dim=D, gate_bias_update_factor=1e-3, dtype="bfloat16"))
    assert gate.correction_bias.dtype == torch.float32
    assert gate.correction_bias.shape == (8,)
    assert "correction_bias" in gate.state_dict()
    assert "correction_bias" not in dict(gate.named_parameters())
    assert TopKGate(MoEConfig(dim=D)).correction_bias is None


def test_group_scores_use_max_without_bias_and_top2_sum_with_bias():
    """One token, 2 groups of 4: group A has one big score, group B two medium ones."""
    E = 8
    cfg = dict(num_experts=E, num_activated_experts=1, num_expert_groups=2, num_limited_groups=1)
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.0, 1.9, 0.0, 0.0]])
    for bias, expected in [(False, 3), (True, 4)]:  # max picks group A; top-2 sum (4 > 3) picks group B
        gate = TopKGate(MoEConfig(dim=E, score_func="sigmoid", correction_bias=bias, **cfg))
        gate.init_weights()
        with torch.no_grad():
            gate.weight.copy_(torch.eye(E))
        sig = logits.sigmoid()
        assert (sig[0, 4] + sig[0, 5] > sig[0, 3] + sig[0, 0]) and sig[0, 3] > sig[0, 4]
        assert gate(logits, None).indices_TK.item() == expected


def test_score_and_weight_gradients_reach_the_router():
    for overrides in [
        {},
        {"score_func": "sigmoid", "correction_bias": True},
        {"softmax_before_topk": False, "router_bias": True},
    ]:
        gate = make_gate(**overrides)
        out = gate(inputs(), None)
        probe = torch.randn_like(out.probs_TE)
        (out.probs_TE * probe).sum().backward()
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        if gate.bias is not None:
            assert gate.bias.grad.abs().sum() > 0
        gate.zero_grad()
        out = gate(inputs(), None)
        (out.weights_TK * torch.randn_like(out.weights_TK)).sum().backward()
        assert gate.weight.grad.abs().sum() > 0


def test_train_gate_false_freezes_router():
    gate = make_gate(train_gate=False, router_bias=True)
    assert not gate.weight.requires_grad and not gate.bias.requires_grad
    x = inputs().requires_grad_()
    out = gate(x, None)
    (out.weights_TK.sum() + (out.probs_TE * torch.randn_like(out.probs_TE)).sum()).backward()
    assert gate.weight.grad is None and gate.bias.grad is None
    assert x.grad is not None  # the input still gets its gradient


def test_route_scale_and_renormalization():
    x = inputs()
    base = make_gate(num_experts=8, num_activated_experts=3)(x, None)
    scaled = make_gate(num_experts=8, num_activated_experts=3, norm_topk_prob=True, route_scale=2.0)(x, None)
    assert torch.equal(base.indices_TK, scaled.indices_TK)
    ref = base.weights_TK / (base.weights_TK.sum(-1, keepdim=True) + 1e-20) * 2.0
    assert_equal(scaled.weights_TK, ref)  # the gate's own ops in its order
    # renormalized by a 3-term sum, then summed again over the 3 slots: two 3-term reductions of values <= 2
    assert_close_rounding(scaled.weights_TK.sum(-1), torch.full((T,), 2.0), terms=3, depth=2)


# ---------- router dtype ----------


def test_fp32_router_on_bf16_input():
    """Default router_dtype fp32: math in fp32 on the upcast input, weights cast back to bf16."""
    gate = make_gate(num_experts=8, num_activated_experts=2, norm_topk_prob=True, dtype="bfloat16")
    assert gate.weight.dtype == torch.bfloat16
    x = inputs(dtype=torch.bfloat16)
    out = gate(x, None)
    ref_w, ref_i = hf_mixtral(x.float(), gate.weight.float(), 2)
    assert out.weights_TK.dtype == torch.bfloat16
    assert out.logits_TE.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
    assert torch.equal(out.indices_TK, ref_i)
    assert_equal(out.weights_TK, ref_w.to(torch.bfloat16))  # same fp32 ops on the same upcast values


@pytest.mark.parametrize("router_dtype", ["bfloat16", None], ids=["bf16", "input-dtype"])
def test_bf16_router_math(router_dtype):
    gate = make_gate(num_experts=8, num_activated_experts=2, norm_topk_prob=True, router_dtype=router_dtype)
    x = inputs(dtype=torch.bfloat16)
    out = gate(x, None)
    logits = F.linear(x, gate.weight.to(torch.bfloat16))
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = probs.topk(2, dim=-1)
    ref_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20)
    assert out.logits_TE.dtype == torch.bfloat16
    # same bf16 ops in the same order on the same shapes: bitwise
    assert_equal(out.logits_TE, logits)
    assert torch.equal(out.indices_TK, top_i)
    assert_equal(out.weights_TK, ref_w)
    # and the bf16 router is genuinely a different computation from the fp32 one
    fp32 = make_gate(num_experts=8, num_activated_experts=2, norm_topk_prob=True)(x, None)
    assert (fp32.logits_TE - out.logits_TE.float()).abs().max() > 0


def test_input_dtype_router_on_fp32_input_is_fp32():
    out = make_gate(router_dtype=None)(inputs(), None)
    assert out.logits_TE.dtype == torch.float32 and out.weights_TK.dtype == torch.float32


# ---------- build_gate, meta-device materialization ----------

ALL_GATES = {
    "topk": (TopKGate, {"correction_bias": True, "router_bias": True}),
    "fake_balanced": (FakeBalancedGate, {}),
    "noisy_topk": (NoisyTopKGate, {"aux_loss_coeff": 1e-2}),
    "hybrid": (HybridGate, {"router_bias": True}),
}


@pytest.mark.parametrize("name", list(ALL_GATES))
def test_build_gate_picks_class_and_exposes_sizes(name):
    cls, extra = ALL_GATES[name]
    gate = build_gate(MoEConfig(dim=D, num_experts=8, num_activated_experts=2, gate=name, **extra))
    assert type(gate) is cls
    assert gate.num_experts == 8
    assert gate.top_k == (8 if name == "hybrid" else 2)


def test_build_gate_rejects_unknown_name():
    cfg = MoEConfig(dim=D)
    cfg.gate = "switch"  # bypasses MoEConfig validation on purpose
    with pytest.raises(ValueError, match="MoEConfig.gate='switch'"):
        build_gate(cfg)


@pytest.mark.parametrize("name", list(ALL_GATES))
def test_meta_build_then_materialize(name):
    """Build on meta, to_empty, poison everything with NaN, init_weights: all finite, biases zero, deterministic."""
    _, extra = ALL_GATES[name]
    cfg = MoEConfig(dim=D, gate=name, **extra)

    def materialize(seed: int):
        with torch.device("meta"):
            gate = build_gate(cfg)
        gate.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(gate.parameters()) + list(gate.buffers()):
                t.fill_(float("nan"))
        torch.manual_seed(seed)
        gate.init_weights(std=0.02)
        return gate

    gate = materialize(0)
    state = gate.state_dict()
    for key, t in state.items():
        assert torch.isfinite(t).all(), key
    if name == "topk":
        assert_equal(gate.correction_bias, torch.zeros(8))
        assert_equal(gate.bias, torch.zeros(8))
        assert 0.01 < gate.weight.std() < 0.03
    for key, t in materialize(0).state_dict().items():
        assert_equal(t, state[key], msg=key)  # the same seed through the same init
    out = gate(inputs(), None)
    assert torch.isfinite(out.weights_TK).all()

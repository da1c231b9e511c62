"""Expert counts are exact integers in any module dtype, and the correction bias stays fp32 (issue 16, item 1).

Megatron kept its token counts in bf16 and the bias update's sign flipped; before this fix automoe's count buffers
followed `model.to(torch.bfloat16)` and 5000 tokens x top-2 over 4 experts counted 9984 slots instead of 10000.
"""

from __future__ import annotations

import torch

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.models import Transformer
from automoe.moe import moe_layers, step_expert_loads, update_gate_biases
from automoe.moe.index import count_per_expert
from automoe.moe.layer import MoE
from automoe.moe.losses import aux_loss
from automoe.moe.types import IdentityReducer
from automoe.train.metrics import expert_load_stats
from tests.tolerance import assert_close_rounding, assert_equal

D, E, K = 8, 4, 2
COUNTERS = ("expert_load", "eval_expert_load", "step_tokens", "dropped_slots")
ABOVE_2_24 = 2**24 + 1  # the first integer float32 cannot hold (bf16 stops at 2^8 + 1)


def _layer(**kw) -> MoE:
    cfg = MoEConfig(
        dim=D,
        moe_inter_dim=8,
        num_experts=E,
        num_activated_experts=K,
        score_func="sigmoid",
        gate_bias_update_factor=1e-3,
        capacity_factor=1.0,
        **kw,
    )
    torch.manual_seed(0)
    layer = MoE(cfg)
    layer.init_weights(std=0.5)
    return layer


def _tokens(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, n, D, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_bf16_model_counts_5000_tokens_top2_exactly():
    layer = _layer().to(torch.bfloat16)
    assert {getattr(layer, n).dtype for n in COUNTERS} == {torch.int64}
    assert layer.gate.correction_bias.dtype == torch.float32
    x = _tokens(5000, torch.bfloat16)
    layer(x)
    route = layer.gate(x.reshape(-1, D), None)
    expected = torch.bincount(route.indices_TK.reshape(-1), minlength=E)
    assert torch.equal(layer.expert_load, expected)  # each expert > 2^8 (bf16 would round every one of them)
    assert expected.min() > 2**8
    assert int(layer.expert_load.sum()) == 10_000 and int(layer.step_tokens) == 5000
    # capacity 1.0: exactly the slots above ceil(5000 * 2 / 4) = 2500 per expert are dropped
    assert int(layer.dropped_slots) == int((expected - 2500).clamp(min=0).sum())
    layer.eval()
    layer(x)
    assert torch.equal(layer.eval_expert_load, expected)


def test_counts_stay_exact_above_2_pow_24_per_expert():
    """A count past 2^24 without 2^24 real tokens: the counters start just below it, then a real forward adds."""
    layer = _layer().to(torch.bfloat16)
    start = 2**24 - 3
    for name in COUNTERS:
        getattr(layer, name).fill_(start)
    x = _tokens(1000, torch.bfloat16)
    layer(x)
    load = count_per_expert(layer.gate(x.reshape(-1, D), None).indices_TK, None, E)
    assert load.dtype == torch.int64
    assert torch.equal(layer.expert_load, start + load)
    assert layer.expert_load.min() > 2**24  # every expert past float32's last exact integer, counted exactly
    assert int(layer.step_tokens) == start + 1000
    assert torch.equal(step_expert_loads(layer)[""], start + load)  # what the bias update and the logs read
    stats = expert_load_stats(layer.expert_load)
    assert stats["load"] == (start + load).tolist()


def _bias_update(layer: MoE, load_E: torch.Tensor) -> torch.Tensor:
    layer.reset_statistics()
    layer.expert_load.copy_(load_E)
    update_gate_biases(layer)
    return layer.gate.correction_bias.clone()


def test_bias_update_after_a_bf16_cast_equals_the_fp32_one():
    """Loads a hair from their mean at 2^24 (float32 rounds 2^24 + 1 to 2^24 and would give sign 0 or the wrong
    sign) and an fp32 bias a bf16 cast would round: the cast model's update is the fp32 model's, bit for bit."""
    load = torch.tensor([ABOVE_2_24, 2**24, 2**24 - 1, 2**24 + 4])  # mean 2^24 + 1
    fp32 = _layer()
    fp32.gate.correction_bias.copy_(torch.tensor([0.3001, -0.2002, 0.1003, 1e-4]))
    cast = _layer()
    cast.gate.correction_bias.copy_(fp32.gate.correction_bias)
    cast.to(torch.bfloat16)
    assert cast.gate.weight.dtype == torch.bfloat16 and cast.gate.correction_bias.dtype == torch.float32
    assert_equal(cast.gate.correction_bias, fp32.gate.correction_bias)  # moved, never rounded
    want = _bias_update(fp32, load)
    got = _bias_update(cast, load)
    assert_equal(got, want)
    # sign(mean - L) = (0, +, +, -): the expert exactly at the mean keeps its bias
    b0 = torch.tensor([0.3001, -0.2002, 0.1003, 1e-4])
    assert_equal(want, b0 + 1e-3 * torch.tensor([0.0, 1.0, 1.0, -1.0]))  # the same elementwise fp32 update


def test_whole_model_cast_keeps_counters_integer_and_biases_fp32():
    moe = MoEConfig(
        moe_inter_dim=16,
        num_experts=E,
        num_activated_experts=K,
        score_func="sigmoid",
        gate_bias_update_factor=1e-3,
    )
    cfg = ModelConfig(
        vocab_size=40,
        dim=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        ffn_inter_dim=32,
        num_dense_layers=0,
        max_seq_len=16,
        moe=moe,
    )
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")  # the builder's path: meta -> empty -> init
    model.init_weights()
    model.to(torch.bfloat16)
    layers = list(moe_layers(model))
    assert layers
    for _, layer in layers:
        assert {getattr(layer, n).dtype for n in COUNTERS} == {torch.int64}
        assert layer.gate.correction_bias.dtype == torch.float32
    model(torch.randint(0, 40, (4, 16)))
    assert all(int(layer.expert_load.sum()) == 4 * 16 * K for _, layer in layers)
    update_gate_biases(model)
    assert all(layer.gate.correction_bias.abs().sum() > 0 for _, layer in layers)


def test_global_aux_loss_reads_int64_counts_above_2_pow_24():
    """The `global` scope divides the accumulated int64 load by the accumulated int64 token count."""
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(16, E, generator=g).softmax(-1)
    idx = probs.topk(K, dim=-1).indices
    load = torch.tensor([ABOVE_2_24, 2**24 - 5, 2**24 + 2, 2**24 + 2])
    tokens = load.sum() // K
    got = aux_loss(
        probs,
        idx,
        None,
        batch=1,
        scope="global",
        reducer=IdentityReducer(),
        global_load_E=load,
        global_tokens=tokens,
    )
    ref = (load.double() * E / (K * tokens.double()) * probs.double().mean(0)).sum()
    # fp32 vs the float64 reference rounded to fp32: the ratio rounded once, a mean over T = 16, a sum over E
    assert_close_rounding(got, ref.float(), terms=16, depth=3)

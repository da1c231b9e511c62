"""The load-balancing study's bias floor (`scripts/study_load_balance.py`): the fitted biases really balance the
data they were fitted on, through the whole model, and the strided sample spreads over the whole stream."""

from __future__ import annotations

import numpy as np
import torch

from automoe.config import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.data.dataset import TokenDataset
from automoe.models import Transformer
from automoe.moe import moe_layers
from tests.unit.test_script_defaults import load_script

study = load_script("study_load_balance")


def _skewed_model(score_func: str) -> Transformer:
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=8,
        num_activated_experts=2,
        moe_inter_dim=16,
        score_func=score_func,
        correction_bias=True,
        **({"num_expert_groups": 4, "num_limited_groups": 2} if score_func == "sigmoid" else {}),
    )
    model = Transformer(
        ModelConfig(vocab_size=64, dim=32, num_layers=3, num_heads=2, max_seq_len=16, moe=moe)
    )
    model.init_weights()
    for _, layer in moe_layers(model):  # a router far from balance: biases that favour experts 0 and 1
        layer.gate.correction_bias.copy_(torch.tensor([0.2, 0.1, 0, 0, 0, 0, 0, 0]))
    return model.eval()


def _max_vio(model, dataset) -> list[float]:
    return [v["max_vio"] for v in study.evaluate_split(model, dataset)["layers"].values()]


def test_fitted_biases_balance_the_fitting_data_through_the_whole_model():
    tokens = np.random.default_rng(0).integers(0, 64, size=16 * 200 + 1)
    data = TokenDataset(tokens=tokens, seq_len=16, vocab_size=64, eos_id=0, pad_id=0)
    for score_func in ("softmax", "sigmoid"):
        model = _skewed_model(score_func)
        before = _max_vio(model, data)
        fitted = study.fit_balancing_biases(model, data)
        after = _max_vio(model, data)  # a full forward: later layers see the refitted earlier layers
        assert min(before) > 0.3, (score_func, before)
        assert max(after) < 0.1, (score_func, after)
        for name, layer in moe_layers(model):
            assert torch.equal(layer.gate.correction_bias, fitted[name])  # left in the model
            assert "_select" not in vars(layer.gate)  # the recording wrapper is gone


def test_strided_windows_spread_over_the_whole_stream():
    tokens = np.arange(16 * 100 + 1)
    data = TokenDataset(tokens=tokens, seq_len=16, vocab_size=10_000, eos_id=0, pad_id=0)
    first, second = (study.StridedWindows(data, 10, offset) for offset in (0.0, 0.5))
    starts = [int(first.windows([i])[0, 0]) // 16 for i in range(10)]
    assert starts == list(range(0, 100, 10))
    assert [int(second.windows([i])[0, 0]) // 16 for i in range(10)] == list(range(5, 100, 10))  # disjoint
    assert len(first) == 10

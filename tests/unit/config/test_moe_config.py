"""MoEConfig validation: every bad combination names the field and the value."""

import warnings

import pytest

from automoe.config.moe import MoEConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_activated_experts": 9}, "num_activated_experts=9"),
        ({"num_expert_groups": 3}, "num_expert_groups=3"),
        ({"num_expert_groups": 4, "num_limited_groups": 5}, "num_limited_groups=5"),
        (
            {"num_experts": 8, "num_expert_groups": 4, "num_limited_groups": 1, "num_activated_experts": 4},
            "num_activated_experts=4",
        ),
        ({"gate_bias_update_factor": 0.01, "train_gate": False}, "gate_bias_update_factor=0.01"),
        ({"gate": "switch"}, "gate='switch'"),
        ({"score_func": "tanh"}, "score_func='tanh'"),
        ({"expert_activation": "swish"}, "expert_activation='swish'"),
        ({"aux_loss_type": "batch"}, "aux_loss_type='batch'"),
        ({"experts_backend": "triton"}, "experts_backend='triton'"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"swiglu_limit": 7.0, "expert_activation": "gelu"}, "swiglu_limit=7.0"),
        ({"fake_gate_noise": 1.5}, "fake_gate_noise=1.5"),
        ({"expert_dropout": 1.0}, "expert_dropout=1.0"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"aux_loss_coeff": -1.0}, "aux_loss_coeff=-1.0"),
        ({"gate_bias_update_factor": 0.1, "gate": "noisy_topk"}, "gate_bias_update_factor"),
    ],
)
def test_invalid_configs_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        MoEConfig(**kwargs)


def test_derived_values():
    cfg = MoEConfig(num_shared_experts=2, moe_inter_dim=96, gate_bias_update_factor=0.001)
    assert cfg.shared_inter_dim == 192
    assert cfg.has_correction_bias
    assert MoEConfig(num_shared_experts=1, shared_expert_inter_dim=40).shared_inter_dim == 40
    assert not MoEConfig().has_correction_bias


def test_group_limited_routing_accepts_valid_layout():
    MoEConfig(num_experts=16, num_activated_experts=4, num_expert_groups=4, num_limited_groups=2)


def test_ineffective_setting_warns():
    with pytest.warns(UserWarning, match="shared_expert_gate"):
        MoEConfig(shared_expert_gate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEConfig()


def test_softmax_before_topk_docs_agree_on_mixtral():
    """The field comment and the gate docstring name the same setting for Mixtral (HF: softmax over E, top-k,
    renormalize = `softmax_before_topk=True` + `norm_topk_prob`, bitwise in test_mixtral_bitwise) and GPT-OSS."""
    import inspect
    import re
    from pathlib import Path

    from automoe.moe.gates.topk import TopKGate

    source = Path(inspect.getfile(MoEConfig)).read_text()
    comment = re.search(r"softmax_before_topk: bool = True\s+#(.*)", source).group(1)
    doc = " ".join(inspect.getdoc(TopKGate).split())
    for text in (comment, doc):
        when_true, when_false = text.split("False", 1)
        when_false = when_false.split(")")[0]  # up to the end of the clause's (models)
        assert "Mixtral" in when_true and "Qwen3" in when_true, text
        assert "GPT-OSS" in when_false and "Mixtral" not in when_false, text

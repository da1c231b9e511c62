"""GLM-4.5 (glm4_moe): the published config.json files as presets / with the published parameter counts, partial
RoPE and the q/k/v biases mapped, the fields the import cannot honour, what export refuses, and that the partial
RoPE is live (parity, export and the SGD step run with every family in test_parity.py / test_families.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from automoe.hf import config_from_hf, config_to_hf, load_hf_checkpoint
from automoe.models import Transformer, num_params
from tests.unit.hf.test_families import _replace, load_preset

GLM45_HUB = {  # zai-org/GLM-4.5 config.json
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "partial_rotary_factor": 0.5,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 131072,
    "moe_intermediate_size": 1536,
    "norm_topk_prob": True,
    "num_attention_heads": 96,
    "n_group": 1,
    "topk_group": 1,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "num_hidden_layers": 92,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "use_qk_norm": True,
    "vocab_size": 151552,
}
GLM45_AIR_HUB = {  # zai-org/GLM-4.5-Air
    **GLM45_HUB,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 128,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 46,
    "use_qk_norm": False,
}


@pytest.mark.parametrize(
    ("hub", "preset", "total", "active"),
    [
        # GLM-4.5 report: 355B total, 32B active; Air: 106B, 12B (the main model: with its MTP layer Air has
        # 109.2B, outside 1%). The active counts leave out the embedding and the output head.
        (GLM45_HUB, None, 355e9, 32e9),
        (GLM45_AIR_HUB, "glm4_5_air", 106e9, 12e9),
    ],
)
def test_published_configs_have_the_published_parameter_counts(hub, preset, total, active):
    cfg, family = config_from_hf(hub)
    assert family == "glm4_moe"
    if preset is not None:
        assert load_preset(preset) == cfg
    assert cfg.mtp_layers == 1  # num_nextn_predict_layers; the published counts are the main model's
    counts = num_params(dataclasses.replace(cfg, mtp_layers=0))  # meta device
    vocab_matrices = 2 * cfg.vocab_size * cfg.dim
    assert abs(counts.total - total) / total < 0.01, counts.total
    assert abs(counts.active - vocab_matrices - active) / active < 0.02, counts.active - vocab_matrices


def test_hub_config_maps_partial_rope_biases_and_routing():
    cfg, _ = config_from_hf(GLM45_HUB, max_seq_len=512)
    moe = cfg.moe
    assert (cfg.head_dim, cfg.rope_dim, cfg.rotary_width, cfg.qkv_bias, cfg.qk_norm) == (
        128,
        64,
        64,
        True,
        True,
    )
    assert (cfg.num_dense_layers, moe.num_shared_experts, moe.route_scale) == (3, 1, 2.5)
    assert (moe.score_func, moe.has_correction_bias, moe.norm_topk_prob) == ("sigmoid", True, True)
    again, family = config_from_hf(config_to_hf(cfg, family="glm4_moe"))
    assert family == "glm4_moe" and again == cfg
    full = config_from_hf({**GLM45_HUB, "partial_rotary_factor": 1.0}, max_seq_len=512)[0]
    assert full.rope_dim is None and config_from_hf(config_to_hf(full, family="glm4_moe"))[0] == full


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config='gptq'"),
    ],
)
def test_unsupported_settings_raise_naming_key_and_value(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**GLM45_HUB, **change}, max_seq_len=512)


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("glm4_moe", {"dense_layers": [5]}, r"dense_layers=\[5\]"),
        (
            "glm4_moe",
            {"moe_score_func": "softmax", "moe_correction_bias": False},
            r"moe\.score_func='softmax'",
        ),
        ("glm4_moe", {"moe_shared_expert_inter_dim": 64}, r"moe\.shared_expert_inter_dim=64"),
        ("glm4_moe", {"qkv_bias": False, "attention_bias": True}, r"attention_bias=True"),
        ("qwen3_moe", {}, r"rope_dim=64"),
    ],
)
def test_export_names_the_setting_a_family_cannot_express(family, changes, message):
    cfg = _replace(config_from_hf(GLM45_HUB, max_seq_len=512)[0], **changes)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{message}"):
        config_to_hf(cfg, family=family)


def test_partial_rope_is_live(saved):
    """RoPE over whole heads changes the logits: the parity in test_parity.py depends on the partial rotary."""
    hf, path = saved("glm4_moe")
    cfg, state = load_hf_checkpoint(path)
    assert cfg.rope_dim == cfg.head_dim // 2
    model = Transformer(dataclasses.replace(cfg, rope_dim=None)).eval()
    model.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() > 1e-3

"""config.json <-> ModelConfig: hub-style configs map field by field, unsupported settings are named, and
exported configs map back to the same ModelConfig."""

import pytest

from automoe.hf import config_from_hf, config_to_hf

# The published DeepSeek-V3 config.json (transformers-4 style keys), abridged to the fields that matter.
DSV3_HUB = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "num_nextn_predict_layers": 1,
    "attention_bias": False,
    "attention_dropout": 0.0,
}
QWEN3_HUB = {
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "use_sliding_window": False,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001,
    "hidden_act": "silu",
}
MIXTRAL_HUB = {
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "router_aux_loss_coef": 0.02,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def test_deepseek_v3_hub_config_maps_every_routing_and_attention_field():
    cfg, family = config_from_hf(DSV3_HUB, max_seq_len=4096)
    moe = cfg.moe
    assert family == "deepseek_v3" and cfg.attention == "mla"
    assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_dense_layers, cfg.max_seq_len) == (
        61,
        7168,
        128,
        3,
        4096,
    )
    assert (
        cfg.q_lora_rank,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    ) == (
        1536,
        512,
        128,
        64,
        128,
    )
    assert (cfg.rope_scaling, cfg.yarn_factor, cfg.yarn_original_max_seq_len) == ("yarn", 40.0, 4096)
    assert (cfg.yarn_mscale, cfg.yarn_mscale_all_dim, cfg.rope_interleave) == (1.0, 1.0, True)
    assert (moe.score_func, moe.correction_bias, moe.norm_topk_prob, moe.route_scale) == (
        "sigmoid",
        True,
        True,
        2.5,
    )
    assert (moe.num_experts, moe.num_activated_experts, moe.num_expert_groups, moe.num_limited_groups) == (
        256,
        8,
        8,
        4,
    )
    assert (moe.num_shared_experts, moe.shared_inter_dim, moe.moe_inter_dim) == (1, 2048, 2048)


def test_qwen3_and_mixtral_hub_configs():
    qwen, _ = config_from_hf(QWEN3_HUB, max_seq_len=512)
    assert (qwen.head_dim, qwen.qk_norm, qwen.num_kv_heads, qwen.num_dense_layers) == (128, True, 4, 0)
    assert (qwen.moe.num_experts, qwen.moe.softmax_before_topk, qwen.moe.norm_topk_prob) == (128, True, True)
    assert qwen.rope_theta == 1e6
    mixtral, _ = config_from_hf(MIXTRAL_HUB, max_seq_len=512)
    assert (mixtral.head_dim, mixtral.qk_norm, mixtral.moe.moe_inter_dim, mixtral.moe.norm_topk_prob) == (
        128,
        False,
        14336,
        True,
    )
    dense, _ = config_from_hf({**QWEN3_HUB, "mlp_only_layers": [0, 1]}, max_seq_len=512)
    assert dense.num_dense_layers == 2


@pytest.mark.parametrize(
    ("hub", "change", "message"),
    [
        (MIXTRAL_HUB, {"sliding_window": 4096}, "sliding_window=4096"),
        (QWEN3_HUB, {"use_sliding_window": True}, "use_sliding_window=True"),
        (QWEN3_HUB, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        (QWEN3_HUB, {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        (QWEN3_HUB, {"mlp_only_layers": [3]}, r"mlp_only_layers=\[3\]"),
        (QWEN3_HUB, {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
        (MIXTRAL_HUB, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (MIXTRAL_HUB, {"model_type": "llama"}, "model_type='llama'"),
        (DSV3_HUB, {"scoring_func": "softmax"}, "scoring_func='softmax'"),
        (DSV3_HUB, {"topk_method": "greedy"}, "topk_method='greedy'"),
        (DSV3_HUB, {"quantization_config": {"quant_method": "fp8"}}, "quantization_config='fp8'"),
    ],
)
def test_unsupported_settings_raise_naming_key_and_value(hub, change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**hub, **change}, max_seq_len=512)


@pytest.mark.parametrize(
    ("hub", "family"), [(DSV3_HUB, "deepseek_v3"), (QWEN3_HUB, "qwen3_moe"), (MIXTRAL_HUB, "mixtral")]
)
def test_exported_config_maps_back_to_the_same_model_config(hub, family):
    cfg, _ = config_from_hf(hub, max_seq_len=512)
    again, fam = config_from_hf(config_to_hf(cfg, family=family))
    assert fam == family and again == cfg


def test_export_refuses_a_config_the_family_cannot_express():
    cfg, _ = config_from_hf(QWEN3_HUB, max_seq_len=512)
    with pytest.raises(
        ValueError, match="ModelConfig.attention='gqa' cannot be expressed as an HF deepseek_v3"
    ):
        config_to_hf(cfg, family="deepseek_v3")

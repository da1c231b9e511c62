"""Tiny random HF models of each family, built from config objects and saved sharded (no download, ever)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMMON = dict(
    vocab_size=97, hidden_size=64, num_attention_heads=4, max_position_embeddings=128, attention_dropout=0.0
)


def hf_config(case: str):
    """The transformers config object of a test case (imports transformers lazily)."""
    tf = pytest.importorskip("transformers")
    if case == "mixtral":
        return tf.MixtralConfig(
            **COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    if case == "qwen2_moe":  # MoE layers {1, 5}: decoder_sparse_step=2 minus mlp_only_layers=[3]
        return tf.Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=6,
            num_key_value_heads=2,
            intermediate_size=80,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )
    if case == "olmoe":  # q/k norm over the whole projection, q/k/v/o biases, softmax top-k not renormalized
        return tf.OlmoeConfig(
            **COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            attention_bias=True,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            pad_token_id=None,
            eos_token_id=None,
        )
    if case == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
    # gpt_oss: sinks, a window of 6 on the even layers, YaRN with exact band edges, the clamp live
    if case == "gpt_oss":
        yarn = dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=4.0,
            original_max_position_embeddings=32,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
        )
        return tf.GptOssConfig(
            **COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
            swiglu_limit=1.0,
            rope_parameters=yarn,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    # glm4_moe: partial RoPE (half of each head), q/k/v biases, per-head q/k norm, group-limited sigmoid routing
    if case == "glm4_moe":
        return tf.Glm4MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=24,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            attention_bias=True,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
            rope_theta=1e6,
            tie_word_embeddings=False,
        )
    dsv3 = dict(
        **COMMON,
        num_hidden_layers=3,
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_mtp_layers=0,  # no MTP tensors in these checkpoints (tests/unit/hf/test_mtp.py adds them)
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        tie_word_embeddings=False,
    )
    if case == "deepseek_v3":  # compressed queries, YaRN with a non-trivial cos/sin gain and softmax mscale
        yarn = dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=32,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=0.707,
            mscale_all_dim=1.0,
        )
        return tf.DeepseekV3Config(**dsv3, q_lora_rank=24, rope_parameters=yarn, rope_interleave=True)
    assert case == "deepseek_v3_plain"  # full-rank queries, plain RoPE in rotate-half layout
    return tf.DeepseekV3Config(**dsv3, q_lora_rank=None, rope_interleave=False)


CASES = (
    "mixtral",
    "qwen3_moe",
    "deepseek_v3",
    "deepseek_v3_plain",
    "qwen2_moe",
    "olmoe",
    "gpt_oss",
    "glm4_moe",
)
ATTN_IMPLEMENTATION = {"gpt_oss": "eager"}  # transformers' reference for attention sinks


def hf_model(case: str, seed: int = 0):
    """A random fp32 HF model in eval mode; every parameter and the correction bias are non-trivial."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = hf_config(case)
    model = tf.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION.get(case)
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.15 * torch.randn_like(p)
            )
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (hf_model, directory) with sharded safetensors (several files + index)."""
    cache = {}

    def get(case: str):
        if case not in cache:
            model = hf_model(case)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path, max_shard_size="100KB")
            cache[case] = (model, path)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def saved_fused(saved, tmp_path_factory):
    """case -> (hf_model, directory) of the same model saved in the fused expert layout transformers v5 keeps in
    memory (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]), sharded with an index."""
    from automoe.hf.safetensors_io import ShardedWriter

    cache = {}

    def get(case: str):
        if case not in cache:
            model, per_expert = saved(case)
            path = tmp_path_factory.mktemp(f"{case}_fused")
            writer = ShardedWriter(path, max_shard_bytes=100_000)
            writer.add_all(model.state_dict().items())
            writer.close()
            (path / "config.json").write_text((per_expert / "config.json").read_text())
            cache[case] = (model, path)
        return cache[case]

    return get

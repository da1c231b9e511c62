"""Mixtral (`MixtralForCausalLM`): GQA without q/k norm or biases, every layer MoE, softmax top-k routing whose K
weights always sum to 1, experts `block_sparse_moe.experts.{e}.w1/w3/w2` (fused layout: `mlp.experts.*`, and the
router moves to `mlp.gate` with it, as transformers v5 renames the block)."""

from __future__ import annotations

from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.families.base import Family, check_common, gqa_heads, plain_rope, require, softmax_moe


class Mixtral(Family):
    name = "mixtral"
    model_types = ("mixtral",)
    architecture = "MixtralForCausalLM"
    moe_prefix = "block_sparse_moe."
    fused_moe_prefix = "mlp."
    expert_names = ("w1", "w3", "w2")
    not_supported = (
        "sliding_window (not implemented)",
        "router_jitter_noise (not implemented)",
        "dense layers, shared experts, attention biases, q/k norm (Mixtral has none: export refuses them)",
        "top-k weights that do not sum to 1 (Mixtral always renormalizes)",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)
        require(hf, "sliding_window", (None,), "sliding-window attention is not implemented")
        require(hf, "router_jitter_noise", (0, 0.0), "router jitter is not implemented")
        require(hf, "attention_bias", (False,), "Mixtral attention has no biases")
        moe = softmax_moe(hf, inter_dim_key="intermediate_size", norm_topk_prob=True)
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            **gqa_heads(hf),
            num_dense_layers=0,
            moe_layer_freq=1,
            moe=moe,
            **plain_rope(hf, self.name),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        self.check_gqa(cfg, qk_norm=None, biases=())
        self.check_routed_experts(cfg)
        self.check_no_shared_experts(cfg)
        self.check_softmax_routing(cfg, renormalized=True)
        self.check_layer_pattern(cfg, first_k=False, freq=False, listed=False)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        moe = cfg.moe
        return dict(
            intermediate_size=moe.moe_inter_dim,
            attention_bias=False,
            num_local_experts=moe.num_experts,
            head_dim=cfg.head_dim,
            sliding_window=None,
            router_aux_loss_coef=moe.aux_loss_coeff,
            router_jitter_noise=0.0,
        )


FAMILY = Mixtral()

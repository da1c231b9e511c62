"""Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA with an RMSNorm over head_dim on every q/k head, optional attention
biases, softmax top-k routing with `norm_topk_prob`, dense layers only as a prefix (`mlp_only_layers = [0..N)`,
`decoder_sparse_step = 1`), experts `mlp.experts.{e}.gate_proj/up_proj/down_proj` (fused: `mlp.experts.*`)."""

from __future__ import annotations

from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.families.base import (
    Family,
    check_common,
    dense_prefix,
    gqa_heads,
    plain_rope,
    softmax_moe,
    unsupported,
    weights_sum_to_one,
)


class Qwen3Moe(Family):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"
    not_supported = (
        "use_sliding_window=true (not implemented)",
        "rope types other than default (YaRN is implemented for MLA only)",
        "decoder_sparse_step != 1 and mlp_only_layers other than a prefix (rejected; Qwen2-MoE maps them through "
        "ModelConfig.dense_layers)",
        "shared experts (Qwen3-MoE has none)",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)  # Qwen3 always writes a sliding_window; use_sliding_window says whether it is used
        step = int(hf.get("decoder_sparse_step", 1))
        if step != 1:
            raise unsupported(
                "decoder_sparse_step", step, "only 1 (with mlp_only_layers a prefix) maps to automoe"
            )
        moe = softmax_moe(hf)
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            **gqa_heads(hf),
            num_dense_layers=dense_prefix(hf.get("mlp_only_layers")),
            moe_layer_freq=1,
            qk_norm=True,
            attention_bias=bool(hf.get("attention_bias", False)),
            moe=moe,
            **plain_rope(hf, self.name),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        self.check_gqa(cfg, qk_norm="head", biases=("attention_bias",))
        self.check_routed_experts(cfg)
        self.check_no_shared_experts(cfg)
        self.check_softmax_routing(cfg)
        self.check_layer_pattern(cfg, first_k=True, freq=False, listed=False)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        moe = cfg.moe
        return dict(
            attention_bias=cfg.attention_bias,
            num_experts=moe.num_experts,
            moe_intermediate_size=moe.moe_inter_dim,
            head_dim=cfg.head_dim,
            norm_topk_prob=weights_sum_to_one(cfg),
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.num_dense_layers)),
            use_sliding_window=False,
            router_aux_loss_coef=moe.aux_loss_coeff,
        )


FAMILY = Qwen3Moe()

"""OLMoE (`OlmoeForCausalLM`, OLMoE-1B-7B): GQA whose q and k are RMS-normalized over the whole projection
(`q_norm` [H*D], `k_norm` [G*D], before the split into heads: `ModelConfig.qk_norm_scope="projection"`),
optional q/k/v/o biases (`attention_bias`), every layer MoE with softmax-then-top-k routing (`norm_topk_prob`,
off in the published models: the K weights are not renormalized), no shared expert, experts
`mlp.experts.{e}.gate_proj/up_proj/down_proj` of width `intermediate_size`."""

from __future__ import annotations

from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.families.base import (
    Family,
    check_common,
    plain_rope,
    require,
    softmax_moe,
    unsupported,
    weights_sum_to_one,
)


class Olmoe(Family):
    name = "olmoe"
    model_types = ("olmoe",)
    architecture = "OlmoeForCausalLM"
    default_norm_eps = 1e-5
    not_supported = (
        "clip_qkv (automoe does not clamp q/k/v)",
        "rope types other than default",
        "head_dim other than hidden_size / num_attention_heads (OLMoE's q/k norms are hidden_size wide)",
        "dense layers and shared experts (OLMoE has none: export refuses them)",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)
        require(hf, "clip_qkv", (None,), "automoe does not clamp q/k/v")
        heads = hf["num_attention_heads"]
        head_dim = hf["hidden_size"] // heads
        if hf.get("head_dim") not in (None, head_dim):
            raise unsupported(
                "head_dim", hf["head_dim"], f"OLMoE heads are hidden_size / heads = {head_dim} wide"
            )
        moe = softmax_moe(hf, inter_dim_key="intermediate_size")
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            num_dense_layers=0,
            moe_layer_freq=1,
            qk_norm=True,
            qk_norm_scope="projection",
            attention_bias=bool(hf.get("attention_bias", False)),
            moe=moe,
            **plain_rope(hf, self.name),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        self.check_gqa(cfg, qk_norm="projection", biases=("attention_bias",))
        if cfg.head_dim * cfg.num_heads != cfg.dim:
            raise self.refuse(
                "head_dim", cfg.head_dim, f"OLMoE heads are dim / num_heads = {cfg.dim // cfg.num_heads} wide"
            )
        self.check_routed_experts(cfg)
        self.check_no_shared_experts(cfg)
        self.check_softmax_routing(cfg)
        self.check_layer_pattern(cfg, first_k=False, freq=False, listed=False)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        moe = cfg.moe
        return dict(
            intermediate_size=moe.moe_inter_dim,
            attention_bias=cfg.attention_bias,
            clip_qkv=None,
            num_experts=moe.num_experts,
            norm_topk_prob=weights_sum_to_one(cfg),
            router_aux_loss_coef=moe.aux_loss_coeff,
        )


FAMILY = Olmoe()

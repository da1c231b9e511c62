"""GLM-4.5 (`Glm4MoeForCausalLM`: GLM-4.5, GLM-4.5-Air): GQA with biases on q/k/v but not o (`attention_bias`),
optional per-head q/k RMSNorm (`use_qk_norm`), partial RoPE in the rotate-half layout over the first
`partial_rotary_factor` (0.5) of each head; DeepSeek-V3 routing (sigmoid scores, `e_score_correction_bias`
selection, group-limited top-k, `routed_scaling_factor`) with shared experts `mlp.shared_experts.*`, a dense prefix
(`first_k_dense_replace`) and an fp32 router weight. Its multi-token-prediction layers
(`model.layers.{i >= num_hidden_layers}`, `num_nextn_predict_layers`) are accounted for but not imported, as
transformers does."""

from __future__ import annotations

import re
from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.adapters import TensorPlan
from automoe.hf.families.base import (
    Family,
    check_common,
    rope_fields,
    sigmoid_moe,
    sigmoid_moe_hf,
)


class Glm4Moe(Family):
    name = "glm4_moe"
    model_types = ("glm4_moe",)
    architecture = "Glm4MoeForCausalLM"
    default_norm_eps = 1e-5
    not_supported = (
        "rope types other than default",
        "multi-token-prediction layers (accounted for, not imported; exported with num_nextn_predict_layers=0)",
        "moe_layer_freq / listed dense layers (GLM-4.5 has a dense prefix only), gated or differently sized "
        "shared experts, a bias on o_proj",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        hf = {"partial_rotary_factor": 0.5, **hf}  # the transformers default
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=head_dim,
            num_dense_layers=int(hf.get("first_k_dense_replace") or 0),
            moe_layer_freq=1,
            qkv_bias=bool(hf.get("attention_bias", False)),
            qk_norm=bool(hf.get("use_qk_norm", False)),
            moe=sigmoid_moe(hf),
            **rope_fields(hf, self.name, head_dim=head_dim),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        self.check_gqa(
            cfg, qk_norm="head" if cfg.qk_norm else None, biases=("qkv_bias",), extras=("rope_dim",)
        )
        self.check_sigmoid_routing(cfg)
        self.check_layer_pattern(cfg, first_k=True, freq=False, listed=False)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        return dict(
            **sigmoid_moe_hf(cfg),
            head_dim=cfg.head_dim,
            attention_bias=cfg.qkv_bias,
            use_qk_norm=cfg.qk_norm,
            partial_rotary_factor=cfg.rotary_width / cfg.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            num_nextn_predict_layers=0,
        )

    def build_plan(self, cfg: ModelConfig, layout: str = "per_expert") -> TensorPlan:
        plan = super().build_plan(cfg, layout)
        plan.ignored_hf = re.compile(r"model\.layers\.(\d+)\.")  # MTP layers live after the main stack
        for i in range(cfg.num_layers):
            if cfg.is_moe_layer(i):  # transformers keeps the router weight in fp32
                plan.fp32_hf.add(f"model.layers.{i}.mlp.gate.weight")
        return plan


FAMILY = Glm4Moe()

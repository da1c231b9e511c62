"""GLM-4.5 (`Glm4MoeForCausalLM`: GLM-4.5, GLM-4.5-Air): GQA with biases on q/k/v but not o (`attention_bias`),
optional per-head q/k RMSNorm (`use_qk_norm`), partial RoPE in the rotate-half layout over the first
`partial_rotary_factor` (0.5) of each head; DeepSeek-V3 routing (sigmoid scores, `e_score_correction_bias`
selection, group-limited top-k, `routed_scaling_factor`) with shared experts `mlp.shared_experts.*`, a dense prefix
(`first_k_dense_replace`) and an fp32 router weight. Its multi-token-prediction layers
(`model.layers.{L + k}`, `num_nextn_predict_layers`; the DeepSeek-V3 layout with a GLM decoder layer) map to
`ModelConfig.mtp_layers` (`automoe/models/mtp.py`), those the checkpoint holds: transformers' `Glm4MoeForCausalLM`
has no MTP module, so a model it saved declares the layer without its tensors and imports without MTP."""

from __future__ import annotations

from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.adapters import TensorPlan
from automoe.hf.families.base import (
    Family,
    check_common,
    declared_mtp_layers,
    mtp_layers_held,
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
        "the MTP layers' copies of the embedding and output head are not read (they are the main model's); export "
        "writes them",
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
            mtp_layers=declared_mtp_layers(hf),
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
            num_nextn_predict_layers=cfg.mtp_layers,
        )

    def build_plan(self, cfg: ModelConfig, layout: str = "per_expert") -> TensorPlan:
        plan = super().build_plan(cfg, layout)
        self.mtp_tensors(plan, cfg)
        for i in range(cfg.num_layers + cfg.mtp_layers):
            if cfg.is_moe_layer(i):  # transformers keeps the router weight in fp32
                plan.fp32_hf.add(f"model.layers.{i}.mlp.gate.weight")
        return plan

    def checkpoint_config(self, hf: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        return mtp_layers_held(hf, keys)


FAMILY = Glm4Moe()

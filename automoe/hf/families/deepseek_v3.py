"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): Multi-head Latent Attention (optionally compressed queries, YaRN),
sigmoid routing with the `e_score_correction_bias` selection bias (noaux_tc), group-limited top-k, routed scaling,
shared experts `mlp.shared_experts.*`, a dense prefix (`first_k_dense_replace`) and `moe_layer_freq`. The
multi-token-prediction layers (`model.layers.{i >= num_hidden_layers}`) are accounted for but not imported; the
published block-fp8 weights are dequantized on import (`automoe/hf/quant.py`)."""

from __future__ import annotations

import re
from typing import Any

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.hf.adapters import TensorPlan
from automoe.hf.families.base import Family, check_common, get, require, rope_params, unsupported

_YARN_KEYS = {
    "factor": "yarn_factor",
    "original_max_position_embeddings": "yarn_original_max_seq_len",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    "mscale": "yarn_mscale",
    "mscale_all_dim": "yarn_mscale_all_dim",
}
_MLA_DIRECT = (
    ("q_proj", "q_proj"),
    ("q_a_proj", "q_a_proj"),
    ("q_a_norm", "q_a_layernorm"),
    ("q_b_proj", "q_b_proj"),
    ("kv_a_proj", "kv_a_proj_with_mqa"),
    ("kv_a_norm", "kv_a_layernorm"),
    ("kv_b_proj", "kv_b_proj"),
    ("o_proj", "o_proj"),
)


def _rope(hf: dict) -> dict[str, Any]:
    """ModelConfig RoPE fields: default or YaRN (with DeepSeek's attention factor and no truncation)."""
    params = rope_params(hf)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported("partial_rotary_factor", params["partial_rotary_factor"], "RoPE covers whole heads")
    if rope_type == "default":
        return out
    if rope_type != "yarn":
        raise unsupported("rope_type", rope_type, "deepseek_v3 supports only 'default' and 'yarn'")
    for key in ("attention_factor", "truncate"):
        if key in params and params[key] not in (None, True):
            raise unsupported(f"rope_parameters.{key}", params[key], "YaRN uses the DeepSeek-V3 defaults")
    if params.get("factor") is None:
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    out["rope_scaling"] = "yarn"
    for hf_key, field in _YARN_KEYS.items():
        if params.get(hf_key) is not None:
            out[field] = type(getattr(ModelConfig, field))(params[hf_key])
    return out


class DeepseekV3(Family):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    architecture = "DeepseekV3ForCausalLM"
    not_supported = (
        "scoring_func other than sigmoid, topk_method other than noaux_tc",
        "rope types other than default and yarn; YaRN attention_factor / truncate other than DeepSeek's",
        "multi-token-prediction layers (accounted for, not imported; exported with num_nextn_predict_layers=0)",
        "quantization other than block fp8 (block fp8 is dequantized on import; export writes unquantized)",
        "a shared-expert gate or shared experts of another width than the routed ones",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)
        require(hf, "scoring_func", ("sigmoid",), "DeepSeek-V3 routing scores with sigmoid")
        require(hf, "topk_method", ("noaux_tc",), "DeepSeek-V3 selects with the correction bias (noaux_tc)")
        groups = hf.get("n_group") or 1
        moe = MoEConfig(
            moe_inter_dim=hf["moe_intermediate_size"],
            num_experts=get(hf, "n_routed_experts", "num_local_experts"),
            num_activated_experts=hf["num_experts_per_tok"],
            num_shared_experts=hf.get("n_shared_experts") or 0,
            score_func="sigmoid",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            num_expert_groups=groups,
            num_limited_groups=hf.get("topk_group") or groups,
            route_scale=float(hf.get("routed_scaling_factor", 1.0)),
            correction_bias=True,
        )
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            num_dense_layers=int(hf.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(hf.get("moe_layer_freq") or 1),
            attention_bias=bool(hf.get("attention_bias", False)),
            moe=moe,
            **_rope(hf),
            attention="mla",
            num_kv_heads=hf["num_attention_heads"],
            head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
            q_lora_rank=hf.get("q_lora_rank") or None,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_interleave=bool(hf.get("rope_interleave", True)),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        moe = cfg.moe
        if cfg.attention != "mla":
            raise self.refuse("attention", cfg.attention, "DeepSeek-V3 uses multi-head latent attention")
        self.check_routed_experts(cfg)
        if moe.score_func != "sigmoid":
            raise self.refuse("moe.score_func", moe.score_func, "DeepSeek-V3 routes with sigmoid scores")
        if not moe.has_correction_bias:
            raise self.refuse("moe.correction_bias", moe.correction_bias, "noaux_tc selects with the bias")
        if moe.shared_expert_gate and moe.num_shared_experts:
            raise self.refuse("moe.shared_expert_gate", True, "DeepSeek-V3 shared experts are not gated")
        if moe.num_shared_experts and moe.shared_expert_inter_dim not in (None, moe.moe_inter_dim):
            raise self.refuse(
                "moe.shared_expert_inter_dim",
                moe.shared_expert_inter_dim,
                f"DeepSeek-V3 shared experts are moe_intermediate_size={moe.moe_inter_dim} wide",
            )
        self.check_layer_pattern(cfg, first_k=True, freq=True, listed=False)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        moe = cfg.moe
        out: dict[str, Any] = dict(
            num_key_value_heads=cfg.num_heads,
            attention_bias=cfg.attention_bias,
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts,
            moe_intermediate_size=moe.moe_inter_dim,
            first_k_dense_replace=cfg.num_dense_layers,
            moe_layer_freq=cfg.moe_layer_freq,
            n_group=moe.num_expert_groups,
            topk_group=moe.num_limited_groups,
            norm_topk_prob=moe.norm_topk_prob,
            routed_scaling_factor=moe.route_scale,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_interleave=cfg.rope_interleave,
            num_nextn_predict_layers=0,
        )
        if cfg.rope_scaling == "yarn":
            scaling = {hf_key: getattr(cfg, field) for hf_key, field in _YARN_KEYS.items()}
            out["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **scaling}
        return out

    def build_plan(self, cfg: ModelConfig, layout: str = "per_expert") -> TensorPlan:
        plan = super().build_plan(cfg, layout)
        plan.ignored_hf = re.compile(r"model\.layers\.(\d+)\.")  # MTP layers live after the main stack
        return plan

    def attention_tensors(self, d: dict[str, str], cfg: ModelConfig, ours: str, hf: str) -> None:
        for our_name, hf_name in _MLA_DIRECT:
            if our_name == "q_proj" and cfg.q_lora_rank is not None:
                continue
            if our_name in ("q_a_proj", "q_a_norm", "q_b_proj") and cfg.q_lora_rank is None:
                continue
            d[ours + f"{our_name}.weight"] = hf + f"{hf_name}.weight"
            if cfg.attention_bias and our_name in ("q_a_proj", "kv_a_proj", "o_proj"):
                d[ours + f"{our_name}.bias"] = hf + f"{hf_name}.bias"


FAMILY = DeepseekV3()

"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): Multi-head Latent Attention (optionally compressed queries, YaRN),
sigmoid routing with the `e_score_correction_bias` selection bias (noaux_tc), group-limited top-k, routed scaling,
shared experts `mlp.shared_experts.*`, a dense prefix (`first_k_dense_replace`) and `moe_layer_freq`. The
`num_nextn_predict_layers` multi-token-prediction layers (`model.layers.{L + k}`) map to `ModelConfig.mtp_layers`
(`automoe/models/mtp.py`), those the checkpoint holds; the published block-fp8 weights are dequantized on import
(`automoe/hf/quant.py`)."""

from __future__ import annotations

from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.adapters import TensorPlan
from automoe.hf.families.base import (
    Family,
    check_common,
    declared_mtp_layers,
    mtp_layers_held,
    require,
    rope_fields,
    sigmoid_moe,
    sigmoid_moe_hf,
    yarn_hf,
)

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


class DeepseekV3(Family):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    architecture = "DeepseekV3ForCausalLM"
    not_supported = (
        "scoring_func other than sigmoid, topk_method other than noaux_tc",
        "rope types other than default and yarn; an explicit YaRN attention_factor",
        "the MTP layers' copies of the embedding and output head are not read (they are the main model's); export "
        "writes them",
        "quantization other than block fp8 (block fp8 is dequantized on import; export writes unquantized)",
        "a shared-expert gate or shared experts of another width than the routed ones",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)
        require(hf, "scoring_func", ("sigmoid",), "DeepSeek-V3 routing scores with sigmoid")
        require(hf, "topk_method", ("noaux_tc",), "DeepSeek-V3 selects with the correction bias (noaux_tc)")
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            num_dense_layers=int(hf.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(hf.get("moe_layer_freq") or 1),
            attention_bias=bool(hf.get("attention_bias", False)),
            moe=sigmoid_moe(hf),
            **rope_fields(hf, self.name, yarn=True),
            attention="mla",
            num_kv_heads=hf["num_attention_heads"],
            head_dim=hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
            q_lora_rank=hf.get("q_lora_rank") or None,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_interleave=bool(hf.get("rope_interleave", True)),
            mtp_layers=declared_mtp_layers(hf),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        if cfg.attention != "mla":
            raise self.refuse("attention", cfg.attention, "DeepSeek-V3 uses multi-head latent attention")
        self.check_sigmoid_routing(cfg)
        self.check_layer_pattern(cfg, first_k=True, freq=True, listed=False)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        out: dict[str, Any] = dict(
            num_key_value_heads=cfg.num_heads,
            attention_bias=cfg.attention_bias,
            **sigmoid_moe_hf(cfg),
            moe_layer_freq=cfg.moe_layer_freq,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_interleave=cfg.rope_interleave,
            num_nextn_predict_layers=cfg.mtp_layers,
        )
        if cfg.rope_scaling == "yarn":
            out["rope_scaling"] = yarn_hf(cfg)
        return out

    def build_plan(self, cfg: ModelConfig, layout: str = "per_expert") -> TensorPlan:
        plan = super().build_plan(cfg, layout)
        self.mtp_tensors(plan, cfg)
        return plan

    def checkpoint_config(self, hf: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        return mtp_layers_held(hf, keys)

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

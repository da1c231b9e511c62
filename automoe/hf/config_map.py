"""Hugging Face `config.json` <-> `ModelConfig` for the Mixtral, Qwen3-MoE and DeepSeek-V3 families.

Settings that change the numerics and that automoe does not implement raise `ValueError` naming the key and
value (sliding windows, other rope types, other activations, quantized weights, ...); purely descriptive keys
(token ids, cache flags, versions) are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_YARN_KEYS = {
    "factor": "yarn_factor",
    "original_max_position_embeddings": "yarn_original_max_seq_len",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    "mscale": "yarn_mscale",
    "mscale_all_dim": "yarn_mscale_all_dim",
}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of an HF checkpoint directory."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"no config.json in HF checkpoint directory {str(path)!r}")
    return json.loads(file.read_text())


def _unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"HF config {key}={value!r} is not supported: {why}")


def _get(hf: dict, *keys: str) -> Any:
    """The value of the first present key (transformers renames some keys through its attribute_map)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"HF config lacks {' / '.join(keys)}")


def _require(hf: dict, key: str, allowed: tuple, why: str) -> None:
    if key in hf and hf[key] not in allowed:
        raise _unsupported(key, hf[key], why)


def _rope(hf: dict, family: str) -> dict[str, Any]:
    """ModelConfig RoPE fields from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params = {**hf["rope_scaling"], **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(
            "partial_rotary_factor", params["partial_rotary_factor"], "RoPE covers whole heads"
        )
    if rope_type == "default":
        return out
    if rope_type != "yarn" or family != "deepseek_v3":
        raise _unsupported(
            "rope_type",
            rope_type,
            f"{family} supports only 'default'" + (" and 'yarn'" if family == "deepseek_v3" else ""),
        )
    for key in ("attention_factor", "truncate"):
        if key in params and params[key] not in (None, True):
            raise _unsupported(f"rope_parameters.{key}", params[key], "YaRN uses the DeepSeek-V3 defaults")
    if params.get("factor") is None:
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    out["rope_scaling"] = "yarn"
    for hf_key, field in _YARN_KEYS.items():
        if params.get(hf_key) is not None:
            out[field] = type(getattr(ModelConfig, field))(params[hf_key])
    return out


def _dense_pattern(hf: dict, family: str) -> tuple[int, int]:
    """(num_dense_layers, moe_layer_freq) from the family's layer pattern keys."""
    if family == "mixtral":
        return 0, 1
    if family == "deepseek_v3":
        return int(hf.get("first_k_dense_replace") or 0), int(hf.get("moe_layer_freq") or 1)
    step, dense = int(hf.get("decoder_sparse_step", 1)), sorted(hf.get("mlp_only_layers") or [])
    if step != 1:
        raise _unsupported(
            "decoder_sparse_step", step, "only 1 (with mlp_only_layers a prefix) maps to automoe"
        )
    if dense != list(range(len(dense))):
        raise _unsupported("mlp_only_layers", dense, "dense layers must be the first N layers")
    return len(dense), 1


def _check_family(hf: dict, family: str) -> None:
    _require(hf, "hidden_act", ("silu",), "experts and dense FFNs are SwiGLU")
    _require(hf, "attention_dropout", (0, 0.0), "automoe attention has no dropout")
    if (
        family == "mixtral"
    ):  # Qwen3 always writes a sliding_window; use_sliding_window says whether it is used
        _require(hf, "sliding_window", (None,), "sliding-window attention is not implemented")
    _require(hf, "use_sliding_window", (False,), "sliding-window attention is not implemented")
    _require(hf, "router_jitter_noise", (0, 0.0), "router jitter is not implemented")
    _require(hf, "scoring_func", ("sigmoid",), "DeepSeek-V3 routing scores with sigmoid")
    _require(hf, "topk_method", ("noaux_tc",), "DeepSeek-V3 selects with the correction bias (noaux_tc)")
    if hf.get("quantization_config"):
        raise _unsupported(
            "quantization_config",
            hf["quantization_config"].get("quant_method"),
            "dequantize the weights first",
        )


def config_from_hf(
    hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"
) -> tuple[ModelConfig, str]:
    """-> (ModelConfig, family) for a parsed HF `config.json`.

    `max_seq_len` bounds the RoPE tables (default: `max_position_embeddings`); `dtype` is the parameter dtype.
    """
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise _unsupported("model_type", family, f"supported families are {list(FAMILIES)}")
    _check_family(hf, family)
    num_dense, freq = _dense_pattern(hf, family)
    moe = _moe_from_hf(hf, family)
    common = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        ffn_inter_dim=hf["intermediate_size"],
        num_dense_layers=num_dense,
        moe_layer_freq=freq,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=max_seq_len or hf["max_position_embeddings"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        init_std=hf.get("initializer_range", 0.02),
        dtype=dtype,
        moe=moe,
        **_rope(hf, family),
    )
    if family == "deepseek_v3":
        cfg = ModelConfig(
            **common,
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
    else:
        cfg = ModelConfig(
            **common,
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or None,
            qk_norm=family == "qwen3_moe",
        )
    return cfg, family


def _moe_from_hf(hf: dict, family: str) -> MoEConfig:
    if family == "deepseek_v3":
        groups = hf.get("n_group") or 1
        return MoEConfig(
            moe_inter_dim=hf["moe_intermediate_size"],
            num_experts=_get(hf, "n_routed_experts", "num_local_experts"),
            num_activated_experts=hf["num_experts_per_tok"],
            num_shared_experts=hf.get("n_shared_experts") or 0,
            score_func="sigmoid",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            num_expert_groups=groups,
            num_limited_groups=hf.get("topk_group") or groups,
            route_scale=float(hf.get("routed_scaling_factor", 1.0)),
            correction_bias=True,
        )
    is_mixtral = family == "mixtral"
    return MoEConfig(
        moe_inter_dim=hf["intermediate_size"] if is_mixtral else hf["moe_intermediate_size"],
        num_experts=_get(hf, "num_local_experts", "num_experts"),
        num_activated_experts=hf["num_experts_per_tok"],
        score_func="softmax",
        softmax_before_topk=True,
        norm_topk_prob=True if is_mixtral else bool(hf.get("norm_topk_prob", False)),
        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
    )


def config_to_hf(cfg: ModelConfig, *, family: str) -> dict[str, Any]:
    """The HF `config.json` dict describing `cfg` as a `family` model (raises if it cannot express it)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {list(FAMILIES)}")
    _check_expressible(cfg, family)
    moe = cfg.moe
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads if cfg.attention == "mla" else cfg.num_kv_heads,
        "intermediate_size": moe.moe_inter_dim if family == "mixtral" else cfg.ffn_inter_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "num_experts_per_tok": moe.num_activated_experts,
        "torch_dtype": cfg.dtype,
    }
    if family == "mixtral":
        hf.update(
            num_local_experts=moe.num_experts,
            head_dim=cfg.head_dim,
            sliding_window=None,
            router_aux_loss_coef=moe.aux_loss_coeff,
            router_jitter_noise=0.0,
        )
    elif family == "qwen3_moe":
        hf.update(
            num_experts=moe.num_experts,
            moe_intermediate_size=moe.moe_inter_dim,
            head_dim=cfg.head_dim,
            norm_topk_prob=moe.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.num_dense_layers)),
            use_sliding_window=False,
            router_aux_loss_coef=moe.aux_loss_coeff,
        )
    else:
        hf.update(_deepseek_fields(cfg))
    return hf


def _deepseek_fields(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    out: dict[str, Any] = dict(
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


def _check_expressible(cfg: ModelConfig, family: str) -> None:
    moe = cfg.moe

    def bad(field: str, value: Any) -> ValueError:
        return ValueError(f"ModelConfig.{field}={value!r} cannot be expressed as an HF {family} config")

    if (cfg.attention == "mla") != (family == "deepseek_v3"):
        raise bad("attention", cfg.attention)
    if moe.expert_activation != "swiglu" or moe.expert_bias or moe.swiglu_limit is not None:
        raise bad("moe.expert_activation", moe.expert_activation)
    if moe.gate != "topk" or moe.router_bias:
        raise bad("moe.gate", moe.gate)
    if family == "deepseek_v3":
        if moe.score_func != "sigmoid" or not moe.has_correction_bias:
            raise bad("moe.score_func", moe.score_func)
        return
    if moe.score_func != "softmax" or moe.num_shared_experts or moe.route_scale != 1.0:
        raise bad("moe.score_func", moe.score_func)
    if moe.has_correction_bias or moe.num_expert_groups != 1:
        raise bad("moe.correction_bias", moe.correction_bias)
    if family == "mixtral" and not _renormalized(cfg):
        raise bad("moe.norm_topk_prob", moe.norm_topk_prob)
    if family == "mixtral" and (cfg.qk_norm or cfg.num_dense_layers):
        raise bad("qk_norm/num_dense_layers", (cfg.qk_norm, cfg.num_dense_layers))
    if family == "qwen3_moe" and (not cfg.qk_norm or cfg.moe_layer_freq != 1):
        raise bad("qk_norm/moe_layer_freq", (cfg.qk_norm, cfg.moe_layer_freq))


def _renormalized(cfg: ModelConfig) -> bool:
    """True when the K softmax weights sum to 1 (renormalized, or softmax taken over the K logits)."""
    return cfg.moe.norm_topk_prob or not cfg.moe.softmax_before_topk

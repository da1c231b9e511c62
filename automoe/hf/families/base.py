"""What one Hugging Face model family is to automoe: the `Family` base class and the helpers its modules share.

A family module (`automoe/hf/families/<name>.py`) defines `FAMILY`, one instance of a `Family` subclass, and holds
everything about that family:
  - `to_model_config(hf)`: `config.json` -> `ModelConfig`; an HF setting that changes the numerics and that automoe
    does not implement raises `ValueError` naming the key and its value (purely descriptive keys such as token
    ids, cache flags and versions are ignored);
  - `to_hf_config(cfg)`: `ModelConfig` -> `config.json`, after `check_expressible(cfg)`, which raises naming the
    automoe setting that the family cannot express and why;
  - `build_plan(cfg, layout)`: every tensor, automoe key <-> HF key, in either expert layout (`adapters.py`);
  - `not_supported`: what the mapping cannot express and why (docs/hf_interop.md shows it).
The registry (`automoe/hf/families/__init__.py`) finds the modules; import, export, the converter and the fine-tune
recipe only talk to it, so adding a family touches its module and its tests only.
"""

from __future__ import annotations

import re
from typing import Any

from automoe.config.checks import check_choice
from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.hf.adapters import EXPERT_LAYOUTS, ExpertTensor, TensorPlan
from automoe.hf.quant import BlockFP8

_DENSE_PROJS = ("gate_proj", "up_proj", "down_proj")
# HF YaRN rope parameter -> ModelConfig field
YARN_KEYS = {
    "factor": "yarn_factor",
    "original_max_position_embeddings": "yarn_original_max_seq_len",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    "mscale": "yarn_mscale",
    "mscale_all_dim": "yarn_mscale_all_dim",
    "truncate": "yarn_truncate",
}


# ---------------------------------------------------------------------------------------------------------------
# import helpers
# ---------------------------------------------------------------------------------------------------------------
def unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"HF config {key}={value!r} is not supported: {why}")


def get(hf: dict, *keys: str) -> Any:
    """The value of the first present key (transformers renames some keys through its attribute_map)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"HF config lacks {' / '.join(keys)}")


def require(hf: dict, key: str, allowed: tuple, why: str) -> None:
    """Raise unless `key` is absent or one of `allowed`."""
    if key in hf and hf[key] not in allowed:
        raise unsupported(key, hf[key], why)


def rope_params(hf: dict) -> dict[str, Any]:
    """RoPE settings from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters` (5), merged."""
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params = {**hf["rope_scaling"], **params}
    return params


def plain_rope(hf: dict, family: str) -> dict[str, Any]:
    """ModelConfig RoPE fields for a family that supports only the default rope type over whole heads."""
    return rope_fields(hf, family)


def rope_fields(
    hf: dict, family: str, *, yarn: bool = False, head_dim: int | None = None, default_theta: float = 10000.0
) -> dict[str, Any]:
    """ModelConfig RoPE fields: `rope_theta`; `rope_dim` for a partial rotary factor (only given the `head_dim`
    it is a fraction of); the YaRN fields when the family supports YaRN (`yarn`), with HF's cos/sin gain (from
    factor and mscale: an explicit `attention_factor` is refused)."""
    params = rope_params(hf)
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", default_theta)))}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        if head_dim is None:
            raise unsupported("partial_rotary_factor", partial, "RoPE covers whole heads")
        out["rope_dim"] = int(head_dim * partial)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return out
    if rope_type != "yarn" or not yarn:
        raise unsupported(
            "rope_type", rope_type, f"{family} supports only 'default'{' and yarn' if yarn else ''}"
        )
    if params.get("attention_factor") is not None:
        raise unsupported(
            "rope_parameters.attention_factor",
            params["attention_factor"],
            "the gain follows from factor/mscale",
        )
    if params.get("factor") is None:
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    out["rope_scaling"] = "yarn"
    for hf_key, field in YARN_KEYS.items():
        if params.get(hf_key) is not None:
            out[field] = type(getattr(ModelConfig, field))(params[hf_key])
    return out


def yarn_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF YaRN rope parameters of `cfg` (inverse of `rope_fields`)."""
    scaling = {hf_key: getattr(cfg, field) for hf_key, field in YARN_KEYS.items()}
    return {"type": "yarn", "rope_type": "yarn", "rope_theta": cfg.rope_theta, **scaling}


def check_common(hf: dict) -> None:
    """Settings every family rejects the same way."""
    require(hf, "hidden_act", ("silu",), "experts and dense FFNs are SwiGLU")
    require(hf, "attention_dropout", (0, 0.0), "automoe attention has no dropout")
    require(hf, "use_sliding_window", (False,), "sliding-window attention is not implemented")
    BlockFP8.from_hf_config(hf)  # raises for a quantization other than block fp8 (dequantized on import)


def softmax_moe(hf: dict, *, inter_dim_key: str = "moe_intermediate_size", **fields: Any) -> MoEConfig:
    """Softmax top-k routing as Mixtral / Qwen / OLMoE write it (`fields` add or override MoEConfig fields)."""
    settings = dict(
        moe_inter_dim=hf[inter_dim_key],
        num_experts=get(hf, "num_experts", "num_local_experts"),
        num_activated_experts=hf["num_experts_per_tok"],
        score_func="softmax",
        softmax_before_topk=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
    )
    return MoEConfig(**{**settings, **fields})


def sigmoid_moe(hf: dict) -> MoEConfig:
    """DeepSeek-V3-style routing (DeepSeek-V3, GLM-4.5): sigmoid scores, selection by `e_score_correction_bias`,
    group-limited top-k (`n_group` / `topk_group`), `routed_scaling_factor`, `n_shared_experts` of the routed
    width."""
    groups = hf.get("n_group") or 1
    return MoEConfig(
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


def sigmoid_moe_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF keys of `sigmoid_moe` (inverse)."""
    moe = cfg.moe
    return dict(
        n_routed_experts=moe.num_experts,
        n_shared_experts=moe.num_shared_experts,
        moe_intermediate_size=moe.moe_inter_dim,
        first_k_dense_replace=cfg.num_dense_layers,
        n_group=moe.num_expert_groups,
        topk_group=moe.num_limited_groups,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.route_scale,
    )


def gqa_heads(hf: dict) -> dict[str, Any]:
    return dict(
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or None,
    )


def declared_mtp_layers(hf: dict) -> int:
    """The multi-token-prediction layers `config.json` declares (`num_nextn_predict_layers`, or transformers 5's
    `num_mtp_layers`)."""
    value = hf.get("num_nextn_predict_layers")
    return int((hf.get("num_mtp_layers") if value is None else value) or 0)


def mtp_layers_held(hf: dict, keys: set[str]) -> dict:
    """`hf` with the declared MTP layers cut to the leading ones whose `eh_proj` the checkpoint holds: transformers'
    `save_pretrained` keeps `num_nextn_predict_layers` (GLM-4.5's and DeepSeek-V3's configs default to 1) but
    writes no MTP tensors, as its ForCausalLM models hold none. A layer whose `eh_proj` is there is imported whole
    (a missing tensor of it is then an error naming it)."""
    declared, L = declared_mtp_layers(hf), hf.get("num_hidden_layers")
    if not declared or not isinstance(L, int):
        return hf  # nothing declared, or a config the family's import refuses on its own
    held = next((k for k in range(declared) if f"model.layers.{L + k}.eh_proj.weight" not in keys), declared)
    if held == declared:
        return hf
    out = {k: v for k, v in hf.items() if k != "num_mtp_layers"}
    return {**out, "num_nextn_predict_layers": held}


def dense_prefix(mlp_only_layers: list[int], key: str = "mlp_only_layers") -> int:
    """num_dense_layers for a list of dense layers that must be the first N."""
    dense = sorted(mlp_only_layers or [])
    if dense != list(range(len(dense))):
        raise unsupported(key, dense, "dense layers must be the first N layers")
    return len(dense)


# ---------------------------------------------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------------------------------------------
class Family:
    """One HF model family (subclassed once per module in this package; see the module docstring)."""

    name: str = ""  # the family's id: the module name and the model_type written on export
    model_types: tuple[str, ...] = ()  # HF model_type values read as this family
    architecture: str = ""  # HF `architectures[0]` written on export
    moe_prefix: str = "mlp."  # module of an MoE block under `model.layers.{i}.`, per-expert layout
    # ... in the fused layout (transformers v5 renames Mixtral's block_sparse_moe with it)
    fused_moe_prefix: str = "mlp."
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    default_norm_eps: float = 1e-6  # rms_norm_eps when config.json has none (the transformers default)
    not_supported: tuple[str, ...] = ()  # what this mapping cannot express, and why (docs/hf_interop.md)

    # ---- import ----
    def to_model_config(
        self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"
    ) -> ModelConfig:
        """The ModelConfig of a parsed `config.json` of this family. `max_seq_len` bounds the RoPE tables (default:
        `max_position_embeddings`); `dtype` is the parameter dtype."""
        raise NotImplementedError

    def common_fields(self, hf: dict, *, max_seq_len: int | None, dtype: str) -> dict[str, Any]:
        """The ModelConfig fields every family reads the same way (RoPE excluded: families differ)."""
        return dict(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            ffn_inter_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", self.default_norm_eps),
            max_seq_len=max_seq_len or hf["max_position_embeddings"],
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
            dtype=dtype,
        )

    def checkpoint_config(self, hf: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        """`config.json` as the checkpoint's tensor names `keys` have it (what `read_hf_config` returns for a
        directory with weights); by default unchanged."""
        return hf

    # ---- export ----
    def to_hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """The HF `config.json` dict describing `cfg` (raises, naming the setting, when it cannot)."""
        self.check_expressible(cfg)
        return {**self.common_hf(cfg), **self.hf_fields(cfg)}

    def common_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": self.name,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "intermediate_size": cfg.ffn_inter_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len,
            "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": cfg.init_std,
            "num_experts_per_tok": cfg.moe.num_activated_experts,
            "torch_dtype": cfg.dtype,
        }

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        """The family's own `config.json` keys (on top of `common_hf`)."""
        raise NotImplementedError

    def check_expressible(self, cfg: ModelConfig) -> None:
        """Raise ValueError naming the first automoe setting this family cannot express."""
        raise NotImplementedError

    def refuse(self, setting: str, value: Any, why: str) -> ValueError:
        return ValueError(
            f"ModelConfig.{setting}={value!r} cannot be expressed as an HF {self.name} config: {why}"
        )

    def check_routed_experts(self, cfg: ModelConfig) -> None:
        """What no supported family has: non-SwiGLU or biased experts, clamped SwiGLU, other gates, router bias."""
        moe = cfg.moe
        if moe.expert_activation != "swiglu":
            raise self.refuse("moe.expert_activation", moe.expert_activation, "HF experts are SwiGLU")
        if moe.expert_bias:
            raise self.refuse("moe.expert_bias", moe.expert_bias, "HF experts have no biases")
        if moe.swiglu_limit is not None:
            raise self.refuse("moe.swiglu_limit", moe.swiglu_limit, "HF experts do not clamp")
        if (moe.swiglu_alpha, moe.swiglu_up_shift) != (1.0, 0.0):
            raise self.refuse("moe.swiglu_alpha", moe.swiglu_alpha, "HF experts are SiLU(gate) * up")
        if moe.gate != "topk":
            raise self.refuse("moe.gate", moe.gate, "HF routers are plain top-k")
        if moe.router_bias:
            raise self.refuse("moe.router_bias", moe.router_bias, "HF routers have no bias")

    def check_softmax_routing(self, cfg: ModelConfig, *, renormalized: bool | None = None) -> None:
        """Softmax routing without groups, selection bias or scaling (Mixtral, Qwen, OLMoE). `renormalized`: the
        family always (True) renormalizes the K weights; None: `norm_topk_prob` says."""
        moe = cfg.moe
        if moe.score_func != "softmax":
            raise self.refuse("moe.score_func", moe.score_func, f"{self.name} routes with a softmax")
        if moe.has_correction_bias:
            raise self.refuse("moe.correction_bias", True, f"{self.name} routers have no selection bias")
        if moe.num_expert_groups != 1:
            raise self.refuse("moe.num_expert_groups", moe.num_expert_groups, "no group-limited routing")
        if moe.route_scale != 1.0:
            raise self.refuse("moe.route_scale", moe.route_scale, "routing weights are not scaled")
        if renormalized and not weights_sum_to_one(cfg):
            raise self.refuse(
                "moe.norm_topk_prob", moe.norm_topk_prob, f"{self.name} always renormalizes the top-k weights"
            )

    def check_sigmoid_routing(self, cfg: ModelConfig) -> None:
        """What `sigmoid_moe` can express: sigmoid scores with the selection bias, ungated shared experts of the
        routed width."""
        moe = cfg.moe
        self.check_routed_experts(cfg)
        if moe.score_func != "sigmoid":
            raise self.refuse("moe.score_func", moe.score_func, f"{self.name} routes with sigmoid scores")
        if not moe.has_correction_bias:
            raise self.refuse("moe.correction_bias", moe.correction_bias, "noaux_tc selects with the bias")
        if moe.shared_expert_gate and moe.num_shared_experts:
            raise self.refuse("moe.shared_expert_gate", True, f"{self.name} shared experts are not gated")
        if moe.num_shared_experts and moe.shared_expert_inter_dim not in (None, moe.moe_inter_dim):
            raise self.refuse(
                "moe.shared_expert_inter_dim",
                moe.shared_expert_inter_dim,
                f"{self.name} shared experts are moe_intermediate_size={moe.moe_inter_dim} wide",
            )

    def check_no_shared_experts(self, cfg: ModelConfig) -> None:
        if cfg.moe.num_shared_experts:
            raise self.refuse("moe.num_shared_experts", cfg.moe.num_shared_experts, f"{self.name} has none")

    def check_gqa(
        self,
        cfg: ModelConfig,
        *,
        qk_norm: str | None,
        biases: tuple[str, ...],
        extras: tuple[str, ...] = (),
    ) -> None:
        """GQA attention with the family's q/k norm (None: none; 'head' / 'projection': required, of that scope),
        the bias fields it can hold (`attention_bias`, `qkv_bias`) and the attention extras it can express
        (`extras`, of: attention_sinks, sliding_window, rope_dim, rope_scaling)."""
        if cfg.attention != "gqa":
            raise self.refuse("attention", cfg.attention, f"{self.name} uses grouped-query attention")
        for extra in ("attention_sinks", "sliding_window", "rope_dim", "rope_scaling"):
            if getattr(cfg, extra) not in (None, False) and extra not in extras:
                raise self.refuse(extra, getattr(cfg, extra), f"{self.name} attention has no such setting")
        if qk_norm is None and cfg.qk_norm:
            raise self.refuse("qk_norm", cfg.qk_norm, f"{self.name} attention has no q/k norm")
        if qk_norm is not None and not cfg.qk_norm:
            raise self.refuse("qk_norm", cfg.qk_norm, f"{self.name} attention always normalizes q and k")
        if qk_norm is not None and cfg.qk_norm_scope != qk_norm:
            raise self.refuse(
                "qk_norm_scope", cfg.qk_norm_scope, f"{self.name} normalizes q/k per {qk_norm!r}"
            )
        for bias in ("attention_bias", "qkv_bias"):
            if getattr(cfg, bias) and bias not in biases:
                allowed = f"only {', '.join(biases)}" if biases else "none"
                raise self.refuse(bias, True, f"{self.name} attention biases: {allowed}")

    def check_layer_pattern(self, cfg: ModelConfig, *, first_k: bool, freq: bool, listed: bool) -> None:
        """The dense/MoE layer pattern the family can state: a first-k dense prefix, a MoE layer frequency, an
        explicit list of dense layers."""
        if cfg.num_dense_layers and not first_k and not listed:
            raise self.refuse("num_dense_layers", cfg.num_dense_layers, f"every {self.name} layer is MoE")
        if cfg.moe_layer_freq != 1 and not freq and not listed:
            raise self.refuse("moe_layer_freq", cfg.moe_layer_freq, f"{self.name} has no MoE layer frequency")
        if cfg.dense_layers and not listed:
            raise self.refuse("dense_layers", list(cfg.dense_layers), f"{self.name} cannot list dense layers")

    # ---- tensors ----
    def build_plan(self, cfg: ModelConfig, layout: str = "per_expert") -> TensorPlan:
        """The complete mapping for a model of `cfg` in this family's HF layout (experts in `layout`)."""
        check_choice("expert layout", layout, EXPERT_LAYOUTS)
        plan = TensorPlan(layout=layout)
        d = plan.direct
        d["tok_embeddings.weight"] = "model.embed_tokens.weight"
        d["norm.weight"] = "model.norm.weight"
        if cfg.tie_embeddings:
            plan.optional_hf.add("lm_head.weight")  # tied: HF may or may not write it
        else:
            d["output.weight"] = "lm_head.weight"
        for i in range(cfg.num_layers):
            self.block_tensors(plan, cfg, i, f"layers.{i}.", f"model.layers.{i}.")
        return plan

    def block_tensors(self, plan: TensorPlan, cfg: ModelConfig, layer_id: int, ours: str, hf: str) -> None:
        """One decoder block's tensors (norms, attention, dense FFN or MoE) under the two prefixes."""
        d = plan.direct
        moe_prefix = self.fused_moe_prefix if plan.layout == "fused" else self.moe_prefix
        d[ours + "attention_norm.weight"] = hf + "input_layernorm.weight"
        d[ours + "ffn_norm.weight"] = hf + "post_attention_layernorm.weight"
        self.attention_tensors(d, cfg, ours + "attention.", hf + "self_attn.")
        if cfg.is_moe_layer(layer_id):
            self.moe_tensors(plan, cfg, ours + "moe.", hf + moe_prefix)
        else:
            for proj in _DENSE_PROJS:
                d[ours + f"feed_forward.{proj}.weight"] = hf + f"mlp.{proj}.weight"

    def attention_tensors(self, d: dict[str, str], cfg: ModelConfig, ours: str, hf: str) -> None:
        """GQA projections (q/k/v biases with `attention_bias` or `qkv_bias`, o bias with `attention_bias`) and
        q/k norms."""
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            d[ours + f"{proj}.weight"] = hf + f"{proj}.weight"
            if cfg.attention_bias or (cfg.qkv_bias and proj != "o_proj"):
                d[ours + f"{proj}.bias"] = hf + f"{proj}.bias"
        if cfg.qk_norm:
            d[ours + "q_norm.weight"] = hf + "q_norm.weight"
            d[ours + "k_norm.weight"] = hf + "k_norm.weight"

    def moe_tensors(self, plan: TensorPlan, cfg: ModelConfig, ours: str, hf: str) -> None:
        """Router (+ selection bias), shared experts, and the two stacked expert tensors."""
        d, moe = plan.direct, cfg.moe
        d[ours + "gate.weight"] = hf + "gate.weight"
        if moe.has_correction_bias:
            d[ours + "gate.correction_bias"] = hf + "gate.e_score_correction_bias"
            plan.fp32_hf.add(hf + "gate.e_score_correction_bias")
        if moe.num_shared_experts:
            self.shared_expert_tensors(d, cfg, ours + "shared_experts.", hf)
        gate, up, down = self.expert_names
        plan.experts.append(
            ExpertTensor(
                ours + "experts.w_up",
                "up",
                (hf + f"experts.{{e}}.{gate}.weight", hf + f"experts.{{e}}.{up}.weight"),
                hf + "experts.gate_up_proj",
            )
        )
        plan.experts.append(
            ExpertTensor(
                ours + "experts.w_down",
                "down",
                (hf + f"experts.{{e}}.{down}.weight",),
                hf + "experts.down_proj",
            )
        )

    def mtp_tensors(self, plan: TensorPlan, cfg: ModelConfig) -> None:
        """The `cfg.mtp_layers` multi-token-prediction depths in the DeepSeek-V3 layout (GLM-4.5 uses it too): depth
        k + 1 is `model.layers.{L + k}.`, a full decoder layer plus `enorm`, `hnorm`, `eh_proj` and
        `shared_head.norm`; its `embed_tokens` / `shared_head.head` are copies of the main model's (written on
        export, never read). Layers beyond `mtp_layers` are accounted for and skipped (`ignored_hf`)."""
        plan.ignored_hf = re.compile(r"model\.layers\.(\d+)\.")
        for k in range(cfg.mtp_layers):
            ours, hf = f"mtp.depths.{k}.", f"model.layers.{cfg.num_layers + k}."
            self.block_tensors(plan, cfg, cfg.num_layers + k, ours + "block.", hf)
            for name in ("enorm", "hnorm", "eh_proj"):
                plan.direct[ours + f"{name}.weight"] = hf + f"{name}.weight"
            plan.direct[ours + "norm.weight"] = hf + "shared_head.norm.weight"
            plan.duplicates[hf + "embed_tokens.weight"] = "tok_embeddings.weight"
            plan.duplicates[hf + "shared_head.head.weight"] = "output.weight"

    def shared_expert_tensors(self, d: dict[str, str], cfg: ModelConfig, ours: str, hf: str) -> None:
        """The fused shared-expert MLP (DeepSeek naming: `mlp.shared_experts.*`)."""
        for proj in _DENSE_PROJS:
            d[ours + f"{proj}.weight"] = hf + f"shared_experts.{proj}.weight"

    def __repr__(self) -> str:
        return f"<HF family {self.name}>"


def weights_sum_to_one(cfg: ModelConfig) -> bool:
    """True when the K softmax weights sum to 1 (renormalized, or softmax taken over the K logits)."""
    return cfg.moe.norm_topk_prob or not cfg.moe.softmax_before_topk

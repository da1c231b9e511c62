"""GPT-OSS (`GptOssForCausalLM`, gpt-oss-20b / -120b): GQA with q/k/v/o biases and a learned attention sink per
head, sliding-window (`layer_types`: the even layers in the published models) and full attention, YaRN RoPE with
exact band edges (`truncate: false`), every layer MoE: a router with a bias whose top-k logits are softmaxed, and
experts with biases and the clamped SwiGLU `(clamp(up) + 1) * g * sigmoid(1.702 g)`, g = clamp(gate). Experts are
stored fused only: `mlp.experts.gate_up_proj` [E, D, 2F] with gate and up columns interleaved (and its bias [E, 2F]),
`mlp.experts.down_proj` [E, F, D] (and its bias [E, D]); the router is `mlp.router`."""

from __future__ import annotations

from typing import Any

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.hf.adapters import ExpertTensor, TensorPlan
from automoe.hf.families.base import Family, check_common, get, gqa_heads, rope_fields, unsupported, yarn_hf

_LAYER_TYPES = ("sliding_attention", "full_attention")


def _window_fields(hf: dict) -> dict[str, Any]:
    """sliding_window / sliding_window_layers from `layer_types` (default: the even layers slide)."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [_LAYER_TYPES[i % 2] for i in range(n)]
    if set(types) - set(_LAYER_TYPES) or len(types) != n:
        raise unsupported("layer_types", types, f"one of {_LAYER_TYPES} per layer")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and not hf.get("sliding_window"):
        raise unsupported("sliding_window", hf.get("sliding_window"), "sliding layers need a window")
    return dict(sliding_window=hf.get("sliding_window") if sliding else None, sliding_window_layers=sliding)


class GptOss(Family):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    architecture = "GptOssForCausalLM"
    default_norm_eps = 1e-5
    not_supported = (
        "MXFP4-quantized checkpoints (the published ones): dequantize them to bf16 with transformers first "
        "(`Mxfp4Config(dequantize=True)`, then `save_pretrained`)",
        "a per-expert layout (GPT-OSS stores fused experts only; export writes them fused)",
        "dense layers, shared experts, q/k norm, experts without biases or clamp (export refuses them)",
        "rope types other than default and yarn; an explicit YaRN attention_factor",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)
        moe = MoEConfig(
            moe_inter_dim=hf["intermediate_size"],
            num_experts=get(hf, "num_local_experts", "num_experts"),
            num_activated_experts=hf["num_experts_per_tok"],
            score_func="softmax",
            softmax_before_topk=False,
            router_bias=True,
            expert_bias=True,
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_up_shift=1.0,
            aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
        )
        heads = gqa_heads(hf)
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            **heads,
            num_dense_layers=0,
            moe_layer_freq=1,
            attention_bias=bool(hf.get("attention_bias", True)),
            attention_sinks=True,
            **_window_fields(hf),
            moe=moe,
            **rope_fields(hf, self.name, yarn=True, default_theta=150000.0),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        moe = cfg.moe
        self.check_gqa(
            cfg,
            qk_norm=None,
            biases=("attention_bias",),
            extras=("attention_sinks", "sliding_window", "rope_scaling"),
        )
        if not cfg.attention_sinks:
            raise self.refuse("attention_sinks", False, "GPT-OSS attention always has sinks")
        required = dict(expert_bias=True, router_bias=True, swiglu_up_shift=1.0, softmax_before_topk=False)
        for field, value in required.items():
            if getattr(moe, field) != value:
                raise self.refuse(f"moe.{field}", getattr(moe, field), f"GPT-OSS has {field}={value}")
        if moe.swiglu_limit is None or moe.expert_activation != "swiglu" or moe.gate != "topk":
            raise self.refuse(
                "moe.swiglu_limit", moe.swiglu_limit, "GPT-OSS experts are clamped SwiGLU behind a top-k gate"
            )
        self.check_softmax_routing(cfg)
        self.check_no_shared_experts(cfg)
        self.check_layer_pattern(cfg, first_k=False, freq=False, listed=False)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        moe = cfg.moe
        rope = (
            yarn_hf(cfg)
            if cfg.rope_scaling == "yarn"
            else {"rope_type": "default", "rope_theta": cfg.rope_theta}
        )
        return dict(
            intermediate_size=moe.moe_inter_dim,
            num_local_experts=moe.num_experts,
            head_dim=cfg.head_dim,
            attention_bias=cfg.attention_bias,
            sliding_window=cfg.sliding_window,
            layer_types=[
                "sliding_attention" if cfg.window_of(i) else "full_attention" for i in range(cfg.num_layers)
            ],
            swiglu_alpha=moe.swiglu_alpha,
            swiglu_limit=moe.swiglu_limit,
            router_aux_loss_coef=moe.aux_loss_coeff,
            rope_parameters=rope,  # written also when default: GptOssConfig would otherwise default to YaRN
        )

    def build_plan(self, cfg: ModelConfig, layout: str = "per_expert") -> TensorPlan:
        return super().build_plan(cfg, "fused")  # the only layout GPT-OSS checkpoints have

    def attention_tensors(self, d: dict[str, str], cfg: ModelConfig, ours: str, hf: str) -> None:
        super().attention_tensors(d, cfg, ours, hf)
        d[ours + "sinks"] = hf + "sinks"

    def moe_tensors(self, plan: TensorPlan, cfg: ModelConfig, ours: str, hf: str) -> None:
        d = plan.direct
        d[ours + "gate.weight"] = hf + "router.weight"
        d[ours + "gate.bias"] = hf + "router.bias"
        experts = (
            ("w_up", "up", "gate_up_proj", "interleaved"),
            ("b_up", "up", "gate_up_proj_bias", "interleaved"),
            ("w_down", "down", "down_proj", "same"),
            ("b_down", "down", "down_proj_bias", "same"),
        )
        for our_name, kind, hf_name, form in experts:
            plan.experts.append(
                ExpertTensor(ours + f"experts.{our_name}", kind, (), hf + f"experts.{hf_name}", form)
            )


FAMILY = GptOss()

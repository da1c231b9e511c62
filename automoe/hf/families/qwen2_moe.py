"""Qwen2-MoE (`Qwen2MoeForCausalLM`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): GQA with biases on q/k/v but not on o
(`qkv_bias`), softmax top-k routing with `norm_topk_prob`, and in every MoE block one shared expert
(`mlp.shared_expert.*`, `shared_expert_intermediate_size` wide) whose output is scaled by
`sigmoid(mlp.shared_expert_gate(x))`. Layer i is MoE iff `i not in mlp_only_layers and (i + 1) %
decoder_sparse_step == 0`; any such pattern maps (to `num_dense_layers` when it is a dense prefix, else to
`ModelConfig.dense_layers`), and export writes the exact list of dense layers with `decoder_sparse_step = 1`."""

from __future__ import annotations

from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.families.base import (
    Family,
    check_common,
    get,
    gqa_heads,
    plain_rope,
    softmax_moe,
    unsupported,
    weights_sum_to_one,
)

_SHARED_PROJS = ("gate_proj", "up_proj", "down_proj")


def layer_pattern(hf: dict) -> dict[str, Any]:
    """(num_dense_layers, moe_layer_freq, dense_layers) reproducing HF's choice of MoE layers."""
    n, step = hf["num_hidden_layers"], int(hf.get("decoder_sparse_step", 1))
    if step < 1:
        raise unsupported("decoder_sparse_step", step, "must be >= 1")
    only = set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(n) if i in only or (i + 1) % step]
    if dense == list(range(len(dense))):  # a dense prefix: the plain first-k pattern
        return dict(num_dense_layers=len(dense), moe_layer_freq=1, dense_layers=[])
    return dict(num_dense_layers=0, moe_layer_freq=1, dense_layers=dense)


class Qwen2Moe(Family):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    architecture = "Qwen2MoeForCausalLM"
    not_supported = (
        "use_sliding_window=true / sliding layer_types (not implemented)",
        "rope types other than default",
        "num_experts=0 or shared_expert_intermediate_size=0 (every Qwen2-MoE block routes and has a shared "
        "expert; export refuses moe.num_shared_experts=0 and moe.shared_expert_gate=false)",
        "a bias on o_proj (attention_bias: Qwen2 biases q/k/v only)",
    )

    def to_model_config(self, hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"):
        check_common(hf)
        types = set(hf.get("layer_types") or ["full_attention"])
        if types != {"full_attention"}:
            raise unsupported("layer_types", sorted(types), "sliding-window attention is not implemented")
        num_experts = get(hf, "num_experts", "num_local_experts")
        if num_experts < 1:
            raise unsupported("num_experts", num_experts, "a dense Qwen2 model is not an MoE")
        shared = hf.get("shared_expert_intermediate_size", 5632)  # the transformers default
        if not shared:
            raise unsupported(
                "shared_expert_intermediate_size", shared, "the shared expert and its gate are always present"
            )
        moe = softmax_moe(hf, num_shared_experts=1, shared_expert_inter_dim=shared, shared_expert_gate=True)
        return ModelConfig(
            **self.common_fields(hf, max_seq_len=max_seq_len, dtype=dtype),
            **gqa_heads(hf),
            **layer_pattern(hf),
            qkv_bias=bool(hf.get("qkv_bias", True)),  # Qwen2 checkpoints predate the key: biases are on
            moe=moe,
            **plain_rope(hf, self.name),
        )

    def check_expressible(self, cfg: ModelConfig) -> None:
        moe = cfg.moe
        self.check_gqa(cfg, qk_norm=None, biases=("qkv_bias",))
        self.check_routed_experts(cfg)
        self.check_softmax_routing(cfg)
        if not moe.num_shared_experts:
            raise self.refuse("moe.num_shared_experts", 0, "every Qwen2-MoE block has a shared expert")
        if not moe.shared_expert_gate:
            raise self.refuse(
                "moe.shared_expert_gate",
                False,
                "Qwen2-MoE always scales its shared expert by sigmoid(shared_expert_gate(x)); "
                "set model.moe.shared_expert_gate=true",
            )
        self.check_layer_pattern(cfg, first_k=True, freq=True, listed=True)

    def hf_fields(self, cfg: ModelConfig) -> dict[str, Any]:
        moe = cfg.moe
        return dict(
            qkv_bias=cfg.qkv_bias,
            num_experts=moe.num_experts,
            moe_intermediate_size=moe.moe_inter_dim,
            shared_expert_intermediate_size=moe.shared_inter_dim,  # n shared experts fused into one MLP
            head_dim=cfg.head_dim,
            norm_topk_prob=weights_sum_to_one(cfg),
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
            use_sliding_window=False,
            router_aux_loss_coef=moe.aux_loss_coeff,
        )

    def shared_expert_tensors(self, d: dict[str, str], cfg: ModelConfig, ours: str, hf: str) -> None:
        for proj in _SHARED_PROJS:
            d[ours + f"{proj}.weight"] = hf + f"shared_expert.{proj}.weight"
        if cfg.moe.shared_expert_gate:
            d[ours + "gate.weight"] = hf + "shared_expert_gate.weight"


FAMILY = Qwen2Moe()

"""Hugging Face interop: config.json mapping, tensor plans, lazy safetensors import (per-expert or fused expert
tensors, block-fp8 dequantized) and sharded export, for the families registered in `automoe/hf/families/`
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, GLM-4.5; see docs/hf_interop.md), and sparse
upcycling of dense checkpoints (`upcycle_from`)."""

from automoe.hf.checkpoint import (
    HFCheckpoint,
    HFLoadReport,
    expert_ids,
    hf_tensors,
    load_hf_checkpoint,
    load_hf_into_model,
    load_hf_weights,
    save_hf_checkpoint,
    validate_checkpoint,
)
from automoe.hf.config_map import config_from_hf, config_to_hf, read_hf_config
from automoe.hf.families import FAMILIES, Family, family_for_model_type, get_family
from automoe.hf.upcycle import upcycle_from

__all__ = [
    "FAMILIES",
    "Family",
    "HFCheckpoint",
    "HFLoadReport",
    "config_from_hf",
    "config_to_hf",
    "expert_ids",
    "family_for_model_type",
    "get_family",
    "hf_tensors",
    "load_hf_checkpoint",
    "load_hf_into_model",
    "load_hf_weights",
    "read_hf_config",
    "save_hf_checkpoint",
    "upcycle_from",
    "validate_checkpoint",
]

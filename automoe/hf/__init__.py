"""Hugging Face interop: config.json mapping, tensor adapters, lazy safetensors import and sharded export for the
Mixtral, Qwen3-MoE and DeepSeek-V3 families (see docs/hf_interop.md)."""

from automoe.hf.checkpoint import (
    HFCheckpoint,
    expert_ids,
    hf_tensors,
    load_hf_checkpoint,
    load_hf_into_model,
    save_hf_checkpoint,
    validate_checkpoint,
)
from automoe.hf.config_map import FAMILIES, config_from_hf, config_to_hf, read_hf_config

__all__ = [
    "FAMILIES",
    "HFCheckpoint",
    "config_from_hf",
    "config_to_hf",
    "expert_ids",
    "hf_tensors",
    "load_hf_checkpoint",
    "load_hf_into_model",
    "read_hf_config",
    "save_hf_checkpoint",
    "validate_checkpoint",
]

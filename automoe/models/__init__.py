"""The decoder-only transformer and its parts (no torch.distributed here: parallelism is applied from outside)."""

from automoe.models.attention import Attention, KVGather
from automoe.models.kv_cache import KVCache
from automoe.models.mlp import FeedForward
from automoe.models.norms import RMSNorm
from automoe.models.rope import RotaryEmbedding, apply_rotary
from automoe.models.transformer import Block, ParamCounts, Transformer, num_params

__all__ = [
    "Attention",
    "Block",
    "FeedForward",
    "KVCache",
    "KVGather",
    "ParamCounts",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "apply_rotary",
    "num_params",
]

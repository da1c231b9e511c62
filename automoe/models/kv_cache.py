"""The key/value cache of incremental decoding: what each attention layer keeps of the tokens already seen.

GQA layers keep their rotated keys and values [B, G, L, A]; MLA layers keep the compressed pair a KV cache is
meant to hold, the normalized latent [B, 1, L, C] and the rotated shared RoPE key [B, 1, L, R]. One process,
inference only. Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKVCache:
    """One layer's view of a `KVCache`: `start` tokens are cached; `update` appends this forward's tokens."""

    def __init__(self, cache: KVCache, layer_id: int) -> None:
        self._cache, self._layer_id = cache, layer_id

    @property
    def start(self) -> int:
        """Tokens cached before this forward (the position of its first token)."""
        return self._cache.length

    def update(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Append this forward's pair ([B, G, S, *] each) along dim 2 -> the pair over every token so far
        ([B, G, L, *], L = start + S)."""
        return self._cache.append(self._layer_id, first, second)

    def causal_mask(self, num_queries: int, device: torch.device) -> Tensor | None:
        """[S, L] bool (True = may attend) for S new queries over L = start + S keys; None when plain SDPA
        masking is exact (one query sees every key; a first chunk is ordinary causal attention)."""
        if num_queries == 1 or self.start == 0:
            return None
        L = self.start + num_queries
        query_pos_S = torch.arange(self.start, L, device=device)
        return torch.arange(L, device=device)[None, :] <= query_pos_S[:, None]


class KVCache:
    """Cached attention inputs of every layer. `Transformer.forward(..., kv_cache=cache)` reads and extends it;
    positions continue from `length`. A fresh cache per sequence batch (rows must share one length)."""

    def __init__(self) -> None:
        self.length = 0  # tokens every layer has cached (advanced once per forward, after the last layer)
        self._pairs: dict[int, tuple[Tensor, Tensor]] = {}

    def layer(self, layer_id: int) -> LayerKVCache:
        return LayerKVCache(self, layer_id)

    def append(self, layer_id: int, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Concatenate a layer's new pair ([B, G, S, *] each) after its cached one -> [B, G, L, *] each."""
        if layer_id in self._pairs:
            cached_first, cached_second = self._pairs[layer_id]
            first, second = torch.cat([cached_first, first], dim=2), torch.cat([cached_second, second], dim=2)
        self._pairs[layer_id] = (first, second)
        return first, second

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

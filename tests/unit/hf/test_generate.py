"""Greedy decoding of imported tiny random HF models equals transformers' `generate` token for token, with and
without the KV cache (GQA and MLA caches), and a cached prompt fed in chunks gives the full forward's logits."""

import pytest
import torch

from automoe.generate import generate
from automoe.hf import load_hf_checkpoint
from automoe.models import KVCache
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import hf_config

pytest.importorskip("transformers")

NEW_TOKENS = 12


def _prompt() -> torch.Tensor:
    return torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_greedy_tokens_equal_transformers_generate(case, saved):
    hf, path = saved(case)
    _, ours = load_hf_checkpoint(path, build_model=True)
    ours.eval()
    prompt = _prompt()
    with torch.no_grad():
        ref = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    cached = generate(ours, prompt, max_new_tokens=NEW_TOKENS)
    uncached = generate(ours, prompt, max_new_tokens=NEW_TOKENS, use_cache=False)
    assert ref.shape == (2, 6 + NEW_TOKENS)
    assert_equal(cached, ref)  # token ids: exact
    assert_equal(uncached, ref)


@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v3"])
def test_prompt_in_chunks_through_the_cache_gives_the_full_logits(case, saved):
    """Chunks after the first take the explicit position mask (start > 0, several queries)."""
    _, path = saved(case)
    _, ours = load_hf_checkpoint(path, build_model=True)
    ours.eval()
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    cache = KVCache()
    with torch.no_grad():
        full = ours(tokens)
        parts = [ours(tokens[:, :4], kv_cache=cache), ours(tokens[:, 4:9], kv_cache=cache)]
        parts.append(ours(tokens[:, 9:], kv_cache=cache))
    assert cache.length == 10
    c = hf_config(case)
    widest = max(c.hidden_size, c.intermediate_size, 10)
    assert_close_rounding(torch.cat(parts, dim=1), full, terms=widest, depth=4 * c.num_hidden_layers + 1)

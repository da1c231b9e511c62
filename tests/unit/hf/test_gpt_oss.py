"""GPT-OSS: the published config.json as a preset with the published parameter counts, the fields the import
cannot honour, what export refuses, and that the sliding windows and sinks imported are live (parity, export and
the SGD step run with every family in test_parity.py / test_families.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from automoe.hf import config_from_hf, config_to_hf, load_hf_checkpoint
from automoe.models import Transformer, num_params
from tests.tolerance import assert_close_rounding
from tests.unit.hf.test_families import _replace, load_preset

GPT_OSS_20B_HUB = {  # openai/gpt-oss-20b config.json, less its mxfp4 quantization_config
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "vocab_size": 201088,
}
GPT_OSS_120B_HUB = {  # openai/gpt-oss-120b
    **GPT_OSS_20B_HUB,
    "num_hidden_layers": 36,
    "num_local_experts": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
}


@pytest.mark.parametrize(
    ("hub", "preset", "total", "active"),
    [
        # OpenAI's model card: 20.91B total, 3.61B active; 116.83B, 5.13B (active without the input embedding)
        (GPT_OSS_20B_HUB, "gpt_oss_20b", 20.91e9, 3.61e9),
        (GPT_OSS_120B_HUB, None, 116.83e9, 5.13e9),
    ],
)
def test_published_configs_have_the_published_parameter_counts(hub, preset, total, active):
    cfg, family = config_from_hf(hub)
    assert family == "gpt_oss"
    if preset is not None:
        assert load_preset(preset) == cfg
    counts = num_params(cfg)  # meta device
    embedding = cfg.vocab_size * cfg.dim  # looked up, not multiplied: the model card does not count it active
    assert abs(counts.total - total) / total < 0.001, counts.total
    assert abs(counts.active - embedding - active) / active < 0.005, counts.active - embedding


def test_hub_config_maps_every_gpt_oss_feature():
    cfg, _ = config_from_hf(GPT_OSS_20B_HUB, max_seq_len=512)
    moe = cfg.moe
    assert (cfg.attention_sinks, cfg.attention_bias, cfg.sliding_window) == (True, True, 128)
    assert cfg.sliding_window_layers == list(range(0, 24, 2)) and cfg.window_of(1) is None
    assert (cfg.rope_scaling, cfg.yarn_factor, cfg.yarn_truncate) == ("yarn", 32.0, False)
    assert cfg.rope_theta == 1.5e5
    assert (moe.router_bias, moe.expert_bias, moe.softmax_before_topk) == (True, True, False)
    assert (moe.swiglu_limit, moe.swiglu_alpha, moe.swiglu_up_shift) == (7.0, 1.702, 1.0)
    again, family = config_from_hf(config_to_hf(cfg, family="gpt_oss"))
    assert family == "gpt_oss" and again == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config='mxfp4'"),
        ({"layer_types": ["chunked_attention"] * 24}, "layer_types="),
        ({"sliding_window": None}, "sliding_window=None"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "attention_factor": 2.0}},
            "attention_factor=2.0",
        ),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ],
)
def test_unsupported_settings_raise_naming_key_and_value(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**GPT_OSS_20B_HUB, **change}, max_seq_len=512)


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("gpt_oss", {"attention_sinks": False}, r"attention_sinks=False"),
        ("gpt_oss", {"moe_expert_bias": False}, r"moe\.expert_bias=False"),
        ("gpt_oss", {"moe_swiglu_up_shift": 0.0}, r"moe\.swiglu_up_shift=0\.0"),
        ("gpt_oss", {"moe_softmax_before_topk": True}, r"moe\.softmax_before_topk=True"),
        ("gpt_oss", {"moe_num_shared_experts": 1}, r"moe\.num_shared_experts=1"),
        ("gpt_oss", {"num_dense_layers": 1}, r"num_dense_layers=1"),
        ("qwen3_moe", {}, r"attention_sinks=True"),
        ("mixtral", {"attention_sinks": False}, r"sliding_window=128"),
    ],
)
def test_export_names_the_setting_a_family_cannot_express(family, changes, message):
    cfg = _replace(config_from_hf(GPT_OSS_20B_HUB, max_seq_len=512)[0], **changes)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{message}"):
        config_to_hf(cfg, family=family)


def test_windows_and_sinks_are_live(saved):
    """Dropping the imported window or sinks changes the logits: the parity in test_parity.py depends on them."""
    hf, path = saved("gpt_oss")
    cfg, state = load_hf_checkpoint(path)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        for change in ({"sliding_window": None, "sliding_window_layers": []}, {"attention_sinks": False}):
            model = Transformer(dataclasses.replace(cfg, **change)).eval()
            # the sinks are dropped only where the change drops them: a model that keeps sinks but does not load
            # them attends to uninitialized memory (NaN logits, depending on what ran before)
            keep_sinks = change.get("attention_sinks", True)
            model.load_state_dict({k: v for k, v in state.items() if keep_sinks or not k.endswith("sinks")})
            assert (model(tokens) - ref).abs().max() > 1e-3, change


def test_decoding_with_a_kv_cache_keeps_windows_and_sinks(saved):
    """A prefix then one token at a time through the KV cache gives the full forward's logits: the window (6 here)
    slides over cached keys and the sinks stay in every softmax."""
    from automoe.models.kv_cache import KVCache

    _, path = saved("gpt_oss")
    _, model = load_hf_checkpoint(path, build_model=True)
    model.eval()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = KVCache()
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :9], kv_cache=cache)]
        steps += [model(tokens[:, s : s + 1], kv_cache=cache) for s in range(9, 16)]
    # the same math with other key counts per SDPA call: reordering error only (as test_parity's bound)
    assert_close_rounding(torch.cat(steps, dim=1), full, terms=64, depth=9)


@pytest.mark.parametrize("layout", ["cp2-contiguous", "cp2-zigzag"])
def test_context_parallel_pieces_keep_windows_and_sinks(layout):
    """Each CP rank's chunk, attending over the gathered keys (simulated in one process), gives the full sequence's
    logits with a sliding window (positions compared across chunks) and sinks (one extra key per rank's softmax)."""
    from tests.unit.models.test_transformer import (
        RecordKV,
        ReplayKV,
        _cp_layout,
        build,
        model_rounding,
        tiny_cfg,
    )

    cfg = tiny_cfg(attention_sinks=True, sliding_window=5, sliding_window_layers=[0, 2], rope_dim=4)
    model = build(cfg).eval()
    with torch.no_grad():
        for block in model.layers.values():
            block.attention.sinks.normal_(0, 1.0)
    B, S = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(S).expand(B, S)
    attns = [blk.attention for blk in model.layers.values()]
    with torch.no_grad():
        recorders = [RecordKV() for _ in attns]
        for attn, rec in zip(attns, recorders):
            attn.kv_gather = rec
        full = model(tokens, positions_BS=pos)
        pieces = _cp_layout(S, layout)
        order = torch.cat(pieces)
        for idx in pieces:
            for attn, rec in zip(attns, recorders):
                attn.kv_gather = ReplayKV(rec, idx, order, cfg)
            got = model(tokens[:, idx], positions_BS=pos[:, idx])
            assert_close_rounding(got, full[:, idx], **model_rounding(cfg))
        for attn in attns:
            attn.kv_gather = None
        windowless = dataclasses.replace(cfg, sliding_window=None, sliding_window_layers=[])
        other = build(windowless).eval()
        other.load_state_dict(model.state_dict())
        assert (other(tokens) - full).abs().max() > 1e-4  # the window is live at S=16

"""ModelConfig validation and derived values, YAML presets, and parameter counts of the real presets (meta only)."""

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.models import Transformer, num_params

PRESETS = Path(__file__).resolve().parents[3] / "configs" / "model"


def load_preset(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(PRESETS / f"{name}.yaml")))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_heads": 4, "num_kv_heads": 3}, "num_heads=4"),
        ({"dim": 130, "num_heads": 4}, "head_dim=None"),
        ({"head_dim": 7}, "head_dim=7"),
        ({"num_dense_layers": 5, "num_layers": 4}, "num_dense_layers=5"),
        ({"dtype": "float64"}, "dtype='float64'"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"moe_layer_freq": 0}, "moe_layer_freq=0"),
        ({"norm_eps": 0.0}, "norm_eps=0.0"),
    ],
)
def test_invalid_values_raise_naming_field_and_value(overrides, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**overrides)


def test_moe_dim_and_dtype_are_derived_without_mutating_the_callers_config():
    moe = MoEConfig(num_experts=4, num_activated_experts=1)
    cfg = ModelConfig(dim=96, num_heads=3, num_kv_heads=1, dtype="bfloat16", moe=moe)
    assert (cfg.moe.dim, cfg.moe.dtype, cfg.moe.num_experts) == (96, "bfloat16", 4)
    assert (moe.dim, moe.dtype) == (64, "float32")
    assert cfg.head_dim == 32


def test_conflicting_moe_dim_warns_and_is_overridden():
    with pytest.warns(UserWarning, match="moe.dim=100 is ignored"):
        cfg = ModelConfig(dim=128, moe=MoEConfig(dim=100))
    assert cfg.moe.dim == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig(dim=128, moe=MoEConfig(dim=128))


def test_moe_layer_pattern():
    cfg = ModelConfig(num_layers=7, num_dense_layers=2, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(7)] == [False, False, True, False, True, False, True]
    assert cfg.num_moe_layers == 3
    model = _meta_model(cfg)
    assert [blk.moe is not None for blk in model.layers.values()] == [cfg.is_moe_layer(i) for i in range(7)]
    assert all((blk.moe is None) == (blk.feed_forward is not None) for blk in model.layers.values())


def test_presets_load_through_the_structured_schema():
    tiny = load_preset("tiny")
    assert (tiny.vocab_size, tiny.dim, tiny.num_layers, tiny.max_seq_len) == (259, 128, 4, 256)
    assert (tiny.moe.num_experts, tiny.moe.num_activated_experts, tiny.moe.num_shared_experts) == (8, 2, 1)
    assert tiny.moe.dim == 128 and tiny.head_dim == 32
    qwen = load_preset("qwen3_30b_a3b")
    assert qwen.head_dim == 128 and qwen.qk_norm and qwen.moe.dim == 2048 and qwen.moe.norm_topk_prob
    mixtral = load_preset("mixtral_8x7b")
    assert mixtral.head_dim == 128 and mixtral.moe.moe_inter_dim == 14336 and not mixtral.tie_embeddings


def test_misspelt_preset_key_fails():
    schema = OmegaConf.structured(ModelConfig)
    with pytest.raises(Exception, match="num_layer"):
        OmegaConf.merge(schema, OmegaConf.create({"num_layer": 3}))


def _meta_model(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


def _reference_counts(cfg: ModelConfig) -> tuple[int, int]:
    """Parameter counts written out by hand for attention + SwiGLU experts + softmax router (no biases)."""
    D, H, G, Dh, V = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    attn = 2 * D * H * Dh + 2 * D * G * Dh + (2 * Dh if cfg.qk_norm else 0)
    E, K, F = cfg.moe.num_experts, cfg.moe.num_activated_experts, cfg.moe.moe_inter_dim
    expert, router, norms = 3 * D * F, E * D, 2 * D
    layer_total = attn + E * expert + router + norms
    layer_active = attn + K * expert + router + norms
    head = 0 if cfg.tie_embeddings else V * D
    rest = V * D + head + D
    return cfg.num_layers * layer_total + rest, cfg.num_layers * layer_active + rest


@pytest.mark.parametrize(
    ("preset", "published_total", "published_active", "active_rtol"),
    [
        ("mixtral_8x7b", 46.7e9, 12.9e9, 0.005),
        # The model card truncates: the exact active count is 3.353B (embedding and head included).
        ("qwen3_30b_a3b", 30.5e9, 3.3e9, 0.02),
    ],
)
def test_real_preset_param_counts_on_meta(preset, published_total, published_active, active_rtol):
    cfg = load_preset(preset)
    model = _meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    counts = num_params(model)
    assert num_params(cfg) == counts
    assert (counts.total, counts.active) == _reference_counts(cfg)
    assert counts.total == pytest.approx(published_total, rel=0.005)
    assert counts.active == pytest.approx(published_active, rel=active_rtol)


def test_param_counts_with_dense_layers_shared_experts_and_tying():
    cfg = dataclasses.replace(load_preset("tiny"), tie_embeddings=True)
    model = _meta_model(cfg)
    D, V, Dh = cfg.dim, cfg.vocab_size, cfg.head_dim
    attn = 2 * D * cfg.num_heads * Dh + 2 * D * cfg.num_kv_heads * Dh
    dense_ffn = 3 * D * cfg.ffn_inter_dim
    E, K, F = cfg.moe.num_experts, cfg.moe.num_activated_experts, cfg.moe.moe_inter_dim
    shared = 3 * D * F * cfg.moe.num_shared_experts
    moe_total = E * 3 * D * F + E * D + shared
    moe_active = K * 3 * D * F + E * D + shared
    n_moe = cfg.num_layers - cfg.num_dense_layers
    common = cfg.num_layers * (attn + 2 * D) + cfg.num_dense_layers * dense_ffn + V * D + D  # tied: one V*D
    counts = num_params(model)
    assert counts.total == common + n_moe * moe_total
    assert counts.active == common + n_moe * moe_active

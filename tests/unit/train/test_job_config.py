"""The Hydra config tree composes onto the JobConfig schema: defaults, overrides, and early, named failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from automoe.config import JobConfig, register_configs

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")


def load(*overrides: str, name: str = "config") -> JobConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(name, overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def test_default_is_the_main_job():
    cfg = load()
    assert isinstance(cfg, JobConfig)
    assert cfg.output_dir == "outputs/run"
    assert (cfg.model.num_layers, cfg.model.moe.num_experts, cfg.model.moe.num_activated_experts) == (4, 8, 2)
    assert cfg.model.moe.num_shared_experts == 1 and cfg.model.moe.dim == cfg.model.dim == 128
    assert cfg.data.source == "stdlib" and cfg.parallel.ep == 2
    assert cfg.checkpoint.interval > 0 and cfg.train.val_interval > 0 and cfg.logging.heatmap


def test_overrides_reach_the_dataclasses():
    cfg = load(
        "train.steps=7",
        "parallel=single",
        "model.moe.num_experts=4",
        "data=synthetic",
        "train.dtype=bfloat16",
    )
    assert cfg.train.steps == 7 and cfg.parallel.ep == 1 and cfg.model.moe.num_experts == 4
    assert cfg.data.source == "synthetic" and cfg.train.dtype == "bfloat16"


@pytest.mark.parametrize("model", ["tiny", "mixtral_8x7b", "qwen3_30b_a3b"])
def test_model_presets_compose(model):
    cfg = load(f"model={model}")
    assert cfg.model.head_dim * cfg.model.num_heads > 0


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as info:
        load("train.stepz=5")
    assert "stepz" in str(info.value.__cause__ or info.value) or "stepz" in str(info.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        load("train.steps=many")
    text = f"{info.value} {info.value.__cause__}"
    assert "steps" in text and "many" in text


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.dtype=float16", "train.dtype='float16'"),
        ("train.nan_policy=ignore", "train.nan_policy='ignore'"),
        ("logging.wandb.mode=cloud", "logging.wandb.mode='cloud'"),
        ("train.micro_batch_size=5", "train.global_batch_size=16 is not a multiple"),
        ("data.seq_len=512", "data.seq_len=512 exceeds model.max_seq_len=256"),
        ("checkpoint.keep_last_n=-1", "checkpoint.keep_last_n=-1"),
        ("train.stop_at_step=1000", "train.stop_at_step=1000"),
    ],
)
def test_bad_values_raise_value_error_naming_field(override, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        load(override)

"""Hydra's `+key=`/`++key=` add keys even to a typed config; `to_job_config` refuses any key the schema lacks,
naming the closest existing one (issue 12 §4). Composed with Hydra's compose API, as the recipes do."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from automoe.config import JobConfig, register_configs
from automoe.config.job import closest_key, schema_keys, to_job_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def composed(*overrides: str, name: str = "config"):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize(
    "override,key,close",
    [
        ("+train.step=5", "train.step", "train.steps"),
        ("++train.step=5", "train.step", "train.steps"),
        ("+model.moe.num_expert=4", "model.moe.num_expert", "model.moe.num_experts"),
        ("+data.seqlen=64", "data.seqlen", "data.seq_len"),
        ("+foo=1", "foo", None),
    ],
)
def test_added_keys_fail_naming_the_closest(override, key, close):
    with pytest.raises(ValueError) as err:
        to_job_config(composed(override))
    message = str(err.value)
    assert f"unknown config key '{key}'" in message
    if close:
        assert f"did you mean '{close}'?" in message
    else:
        assert "did you mean" not in message


def test_finetune_config_refuses_them_too():
    with pytest.raises(ValueError, match="unknown config key 'checkpoint.resum'.*'checkpoint.resume'"):
        to_job_config(composed("hf.init_from=x", "+checkpoint.resum=latest", name="finetune"))


def test_force_add_of_an_existing_key_is_an_override():
    assert to_job_config(composed("++train.steps=7")).train.steps == 7
    assert isinstance(to_job_config(composed()), JobConfig)


def test_closest_key_searches_sections_then_leaves():
    assert closest_key("train.stepz") == "train.steps"
    assert closest_key("lr") == "optim.lr"  # no top-level key is close: the leaf is looked up everywhere
    assert "checkpoint.init_from" in schema_keys() and "model.moe.num_experts" in schema_keys()

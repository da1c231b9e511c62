"""Pipeline layout: the stage split, and bad pipeline settings refused before any collective, naming the setting."""

import pytest

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.config.parallel import ParallelConfig
from automoe.parallel.dims import ParallelDims
from automoe.parallel.pipeline import balanced_split, check_pipeline, stage_layer_ids


def _cfg(num_layers: int = 4, **kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, num_activated_experts=2, moe_inter_dim=16)
    return ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        ffn_inter_dim=48,
        moe=moe,
        **kw,
    )


def test_balanced_split_gives_the_embedding_and_head_stages_fewer_blocks():
    assert balanced_split([10] * 6, 3) == [2, 2, 2]
    # costs 45 / 40 / 45: the even-looking [3, 3, 2] would cost 55 / 30 / 45
    assert balanced_split([10] * 8, 3, first_extra=25, last_extra=25) == [2, 4, 2]
    assert balanced_split([10] * 4, 4) == [1, 1, 1, 1]
    sizes = balanced_split([5, 9, 9, 9, 9, 9, 9, 9], 2, first_extra=8, last_extra=9)
    assert sum(sizes) == 8 and min(sizes) >= 1


def test_stage_layer_ids_explicit_and_automatic():
    assert stage_layer_ids(_cfg(), ParallelConfig(pp=2, pp_layers_per_stage=[1, 3])) == [
        ["0"],
        ["1", "2", "3"],
    ]
    auto = stage_layer_ids(_cfg(), ParallelConfig(pp=2, pp_schedule="Interleaved1F1B", pp_virtual_stages=2))
    assert [len(s) for s in auto] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("pcfg", "model_kw", "micro_batches", "match"),
    [
        (
            dict(pp=3, fsdp=False),
            dict(num_layers=2),
            4,
            r"pp \* parallel.pp_virtual_stages = 3\*1 = 3 stages but ",
        ),
        (dict(pp=2, fsdp=False, pp_layers_per_stage=[1, 2]), {}, 4, r"parallel.pp_layers_per_stage=\[1, 2\]"),
        (dict(pp=2, fsdp=False), {}, 1, r"1 micro-batches per step .* fewer than parallel.pp=2"),
        (
            dict(pp=2, fsdp=True, pp_schedule="Interleaved1F1B", pp_virtual_stages=2),
            {},
            4,
            r"parallel.fsdp=true with parallel.pp_virtual_stages=2",
        ),
        (
            dict(pp=2, fsdp=False),
            dict(tie_embeddings=True),
            4,
            r"model.tie_embeddings=true with parallel.pp=2",
        ),
        (
            dict(pp=2, fsdp=False, pp_schedule="Interleaved1F1B", pp_virtual_stages=2),
            {},
            5,
            r"Interleaved1F1B needs the 5 micro-batches per step to be a multiple of 2 rounds",
        ),
    ],
)
def test_bad_pipeline_layouts_name_the_setting(pcfg, model_kw, micro_batches, match):
    with pytest.raises(ValueError, match=match):
        check_pipeline(_cfg(**model_kw), ParallelConfig(**pcfg), num_micro_batches=micro_batches)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pp_schedule="ZeroBubble"), r"parallel.pp_schedule='ZeroBubble' is not one of"),
        (dict(pp=0), r"parallel.pp=0 must be >= 1"),
        (
            dict(pp=2, pp_virtual_stages=2),
            r"parallel.pp_virtual_stages=2 needs .* not parallel.pp_schedule=1F1B",
        ),
    ],
)
def test_bad_pipeline_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_world_size_must_be_a_product_with_pp():
    with pytest.raises(
        ValueError, match=r"world size 6 is not divisible by pp\*dp_replicate\*cp = 4\*1\*1 = 4"
    ):
        ParallelDims(world_size=6, pp=4)
    with pytest.raises(ValueError, match=r"pp\*dp_replicate\*dp_shard\*cp = 2\*1\*4\*1 = 8 does not match"):
        ParallelDims(world_size=4, pp=2, dp_shard=4)
    dims = ParallelDims(world_size=8, pp=2, ep=4, num_experts=8)
    assert (dims.dp_shard, dims.stage_size, dims.ep_shard, dims.data_parallel) == (4, 4, 1, 4)

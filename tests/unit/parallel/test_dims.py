"""ParallelDims validation happens before any collective and names the product that fails."""

import pytest

from automoe.parallel.dims import ParallelDims


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 4, "ep": 3}, r"parallel.ep=3 must divide dp_shard\*cp = 4\*1 = 4"),
        ({"world_size": 4, "ep": 4, "num_experts": 6}, r"num_experts % ep = 6 % 4"),
        (
            {"world_size": 4, "dp_shard": 2, "cp": 1},
            r"dp_replicate\*dp_shard\*cp = 1\*2\*1 = 2 does not match the world size 4",
        ),
        ({"world_size": 6, "cp": 4}, r"world size 6 is not divisible by dp_replicate\*cp = 1\*4 = 4"),
        ({"world_size": 2, "cp": 0}, r"parallel.cp=0 must be >= 1"),
        ({"world_size": 4, "cp": 2, "ep": 4, "dp_shard": 1}, r"dp_replicate\*dp_shard\*cp = 1\*1\*2 = 2"),
        (
            {"world_size": 8, "dp_replicate": 2, "cp": 2, "ep": 8},
            r"parallel.ep=8 must divide dp_shard\*cp = 2\*2",
        ),
    ],
)
def test_bad_layouts_raise_before_any_collective(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_inferred_degrees_and_ep_borrowing():
    dims = ParallelDims(world_size=8, dp_replicate=2, cp=2, ep=2, num_experts=8)
    assert dims.dp_shard == 2
    assert dims.ep_shard == 2  # (dp_shard * cp) / ep
    assert dims.data_parallel == 4


def test_single_process_needs_no_meshes():
    dims = ParallelDims(world_size=1)
    assert (dims.dp_shard, dims.ep_shard, dims.dp_coordinate()) == (1, 1, (0, 1))
    with pytest.raises(RuntimeError, match="build_meshes"):
        _ = dims.ep_mesh

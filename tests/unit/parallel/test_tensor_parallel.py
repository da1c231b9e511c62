"""The tensor-parallel plan (which parameter gets which placement, what each rank keeps) and the layout checks.

The plan is applied in one process on a fake 2-rank process group (no communication: parallelizing a meta-device
model runs no collective), as rank 1 of tp=2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.config.parallel import ParallelConfig
from automoe.models.transformer import Transformer
from automoe.parallel import ParallelDims, parallelize
from automoe.parallel.tensor_parallel import SequenceSlice, check_tensor_parallel

TP = 2


def _cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, num_activated_experts=2, moe_inter_dim=16, num_shared_experts=1)
    base = dict(
        vocab_size=65, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_inter_dim=48, num_dense_layers=1
    )
    return ModelConfig(**(base | kw), moe=moe)


@pytest.fixture
def fake_world():
    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=TP)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_plan_shards_the_dense_parts_and_leaves_the_moe_layer_whole(fake_world):
    cfg = _cfg(qk_norm=True)
    dims = ParallelDims(world_size=TP, tp=TP, num_experts=4)
    dims.build_meshes()
    with torch.device("meta"):
        model = Transformer(cfg)
    names = [n for n, _ in model.named_parameters()]
    parallelize(model, dims, ParallelConfig(tp=TP, fsdp=False))
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
    colwise, rowwise, replicated = Shard(0), Shard(1), Replicate()
    want = {
        "tok_embeddings.weight": (colwise, (32, 32)),  # vocab rows 65 = 33 + 32: rank 1 keeps 32
        "output.weight": (colwise, (32, 32)),
        "norm.weight": (replicated, (32,)),
    }
    for i in ("0", "1"):
        want |= {
            f"layers.{i}.attention_norm.weight": (replicated, (32,)),
            f"layers.{i}.ffn_norm.weight": (replicated, (32,)),
            f"layers.{i}.attention.q_proj.weight": (colwise, (2 * 8, 32)),  # 2 of 4 heads of width 8
            f"layers.{i}.attention.k_proj.weight": (colwise, (1 * 8, 32)),  # 1 of 2 kv heads
            f"layers.{i}.attention.v_proj.weight": (colwise, (1 * 8, 32)),
            f"layers.{i}.attention.o_proj.weight": (rowwise, (32, 2 * 8)),
        }
    want |= {
        "layers.0.feed_forward.gate_proj.weight": (colwise, (24, 32)),
        "layers.0.feed_forward.up_proj.weight": (colwise, (24, 32)),
        "layers.0.feed_forward.down_proj.weight": (rowwise, (32, 24)),
    }
    params = dict(model.named_parameters())
    for name, (placement, local_shape) in want.items():
        p = params[name]
        assert isinstance(p, DTensor) and p.device_mesh.mesh_dim_names == ("tp",), name
        assert p.placements == (placement,), f"{name}: {p.placements}"
        assert tuple(p.to_local().shape) == local_shape, f"{name}: {tuple(p.to_local().shape)}"
    # not tensor-parallel: the MoE layer (router, experts, shared experts) and the per-head q/k norms
    plain = {n for n, p in params.items() if not isinstance(p, DTensor)}
    assert plain == {n for n in names if ".moe." in n or n.endswith(("q_norm.weight", "k_norm.weight"))}
    for block in model.layers.values():
        assert (block.attention.num_heads, block.attention.num_kv_heads) == (2, 1)  # this rank's heads
    hooks = list(model.layers["1"].moe._forward_pre_hooks.values())
    assert [type(h) for h in hooks] == [SequenceSlice] and (hooks[0].rank, hooks[0].size) == (1, TP)


def test_sequence_slice_gives_the_moe_layer_this_ranks_chunk():
    mask_BS = torch.arange(12).view(2, 6) % 5 == 0
    docs_BS = torch.arange(12).view(2, 6)
    _, kwargs = SequenceSlice(rank=1, size=3)(
        None, (), {"padding_mask_BS": mask_BS, "document_ids_BS": docs_BS}
    )
    assert torch.equal(kwargs["document_ids_BS"], torch.tensor([[2, 3], [8, 9]]))
    assert torch.equal(kwargs["padding_mask_BS"], mask_BS[:, 2:4])
    _, kwargs = SequenceSlice(rank=0, size=2)(None, (), {"padding_mask_BS": None})
    assert kwargs["padding_mask_BS"] is None


@pytest.mark.parametrize(
    ("model_kw", "check_kw", "match"),
    [
        (
            dict(num_heads=6, num_kv_heads=2, head_dim=8),
            dict(tp=4),
            r"model.num_heads=6 is not divisible by parallel.tp=4",
        ),
        (dict(num_kv_heads=1), dict(tp=2), r"model.num_kv_heads=1 is not divisible by parallel.tp=2"),
        (dict(ffn_inter_dim=49), dict(tp=2), r"model.ffn_inter_dim=49 is not divisible by parallel.tp=2"),
        ({}, dict(tp=2, seq_len=12, cp=4), r"data.seq_len=12 is not divisible by parallel.cp\*tp = 4\*2 = 8"),
        (dict(attention_sinks=True), dict(tp=2), r"model.attention_sinks=true"),
        (dict(tie_embeddings=True), dict(tp=2), r"model.tie_embeddings=true"),
        (dict(qk_norm=True, qk_norm_scope="projection"), dict(tp=2), r"model.qk_norm_scope='projection'"),
    ],
)
def test_layouts_tp_cannot_shard_name_the_setting(model_kw, check_kw, match):
    with pytest.raises(ValueError, match=match):
        check_tensor_parallel(_cfg(**model_kw), **check_kw)


def test_supported_layouts_pass_the_check():
    check_tensor_parallel(_cfg(), tp=2, seq_len=16, cp=2)
    check_tensor_parallel(_cfg(num_kv_heads=1), tp=1)  # tp=1 checks nothing


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"world_size": 4, "tp": 2, "ep": 1, "dp_shard": 4},
            r"dp_replicate\*dp_shard\*cp\*tp = 1\*4\*1\*2 = 8",
        ),
        ({"world_size": 6, "tp": 4}, r"world size 6 is not divisible by dp_replicate\*cp\*tp = 1\*1\*4 = 4"),
        ({"world_size": 4, "tp": 4, "ep": 2, "num_experts": 4}, r"parallel.ep=2 must be 1 or a multiple of"),
        (
            {"world_size": 4, "tp": 2, "ep": 8, "num_experts": 8},
            r"parallel.ep=8 must divide dp_shard\*cp\*tp",
        ),
        ({"world_size": 2, "tp": 0}, r"parallel.tp=0 must be >= 1"),
    ],
)
def test_bad_tp_degrees_raise_before_any_collective(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_ep_borrows_tp_ranks():
    dims = ParallelDims(world_size=8, tp=2, ep=4, num_experts=8)
    assert (dims.dp_shard, dims.ep_shard, dims.data_parallel, dims.stage_size) == (4, 2, 4, 8)
    with pytest.raises(ValueError, match=r"parallel.tp=0 must be >= 1"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match=r"parallel.compile=true with parallel.tp=2 is not supported yet"):
        ParallelConfig(tp=2, compile=True)


def test_a_dense_block_costs_one_gather_and_one_scatter_per_projection_group(fake_world):
    """Sequence parallelism's collectives, counted (fake group: values meaningless, counts exact). Forward: the
    embedding's reduce-scatter, an all-gather before attention and before the FFN, a reduce-scatter after each, the
    head's all-gather of its input and of the logits. Backward: the mirror image, with the gradients that q/k/v_proj
    (gate/up_proj, the head) put on their shared input summed before one reduce-scatter: no all-reduce."""
    from torch.distributed.tensor.debug import CommDebugMode

    dims = ParallelDims(world_size=TP, tp=TP, num_experts=4)
    dims.build_meshes()
    with torch.device("meta"):
        model = Transformer(_cfg(num_layers=1, num_dense_layers=1))
    parallelize(model, dims, ParallelConfig(tp=TP, fsdp=False))
    model.to_empty(device="cpu")
    model.init_weights()
    funcol = torch.ops.c10d_functional
    with CommDebugMode() as forward:
        logits = model(torch.randint(0, 65, (1, 8)))
    assert forward.get_comm_counts() == {funcol.reduce_scatter_tensor: 3, funcol.all_gather_into_tensor: 4}
    with CommDebugMode() as backward:
        logits.sum().backward()
    assert backward.get_comm_counts() == {funcol.reduce_scatter_tensor: 3, funcol.all_gather_into_tensor: 3}


def test_tp_is_the_innermost_axis_and_ep_borrows_it():
    """World 8 as pp=2 x dp_shard=2 x tp=2 with ep=2, seen from rank 5 (stage 1, data rank 0, tp rank 1)."""
    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)
    try:
        dims = ParallelDims(world_size=8, pp=2, tp=2, ep=2, num_experts=4)
        dims.build_meshes()
        groups = {
            "tp": dims.tp_mesh,
            "ep": dims.ep_mesh,
            "sequence": dims.sequence_mesh,
            "replicas": dims.dense_replica_mesh,
            "stage": dims.all_data_mesh,
            "pp": dims.pp_mesh,
        }
        ranks = {name: sorted(dist.get_process_group_ranks(m.get_group())) for name, m in groups.items()}
        assert ranks == {
            "tp": [4, 5],  # consecutive ranks
            "ep": [4, 5],  # ep = tp: the experts' all-to-all stays inside the tp pair
            "sequence": [4, 5],  # cp=1: the tp pair holds pieces of the same sequences
            "replicas": [5, 7],  # the same tp shard on the other data rank of the stage
            "stage": [4, 5, 6, 7],
            "pp": [1, 5],
        }
        assert dims.dp_coordinate() == (0, 2)  # tp ranks share their data rank's sequences
    finally:
        dist.destroy_process_group()


def test_mla_plan_splits_the_heads_and_replicates_the_latents(fake_world):
    cfg = _cfg(
        attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
    )
    check_tensor_parallel(cfg, tp=TP)  # num_kv_heads plays no part in MLA
    dims = ParallelDims(world_size=TP, tp=TP, num_experts=4)
    dims.build_meshes()
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, dims, ParallelConfig(tp=TP, fsdp=False))
    attention = model.layers["0"].attention
    heads = {  # 2 of 4 heads: q = nope 8 + rope 8 per head, kv_b = nope 8 + v 8 per head
        "q_b_proj": (Shard(0), (2 * 16, 16)),
        "kv_b_proj": (Shard(0), (2 * 16, 16)),
        "o_proj": (Shard(1), (32, 2 * 8)),
    }
    for name, (placement, local_shape) in heads.items():
        w = getattr(attention, name).weight
        assert w.placements == (placement,) and tuple(w.to_local().shape) == local_shape, name
    for name in ("q_a_proj", "q_a_norm", "kv_a_proj", "kv_a_norm"):  # replicated, per-rank gradient parts
        assert not isinstance(getattr(attention, name).weight, DTensor), name
    assert attention.num_heads == 2


def test_finalized_gradients_have_their_parameters_shards(fake_world):
    """DTensor's embedding backward hands the vocab-sharded embedding its whole [V, D] gradient, replicated over tp;
    after `finalize_grads` every tp-sharded gradient holds this rank's rows only (what clipping and AdamW then see)."""
    from automoe.parallel import finalize_grads

    dims = ParallelDims(world_size=TP, tp=TP, num_experts=4)
    dims.build_meshes()
    with torch.device("meta"):
        model = Transformer(_cfg(num_layers=1, num_dense_layers=1))
    parallelize(model, dims, ParallelConfig(tp=TP, fsdp=False))
    model.to_empty(device="cpu")
    model.init_weights()
    model(torch.randint(0, 65, (1, 8))).sum().backward()
    embedding = model.tok_embeddings.weight
    assert embedding.grad.placements == (Replicate(),)  # the precondition: what the fix is for
    finalize_grads(model, dims)
    sharded = [(n, p) for n, p in model.named_parameters() if any(isinstance(q, Shard) for q in p.placements)]
    assert "tok_embeddings.weight" in dict(sharded)
    for name, p in sharded:
        assert p.grad.placements == p.placements, name
        assert p.grad.to_local().shape == p.to_local().shape, name

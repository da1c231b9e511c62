"""Planner tensor-parallel terms (Megatron TP + sequence parallel) against hand counts on the tiny model."""

import math

import pytest

from automoe import planner
from automoe.planner.comm import tp_messages_per_micro_batch, tp_replicated_numel
from automoe.planner.memory import Stage, tp_shard_dim

# tiny: D=128, 4 blocks (block 0 dense, F=512), H=4 heads of 32, 2 kv heads, E=8, K=2, F_moe=128, one shared expert
TINY = planner.load_model_config("tiny")
SHAPE = planner.TrainingShape(global_batch=4, micro_batch=4, seq_len=128, compute_dtype="float32", fsdp=False)
T, D, A = 4 * 128, 128, 4


def _spec(name):
    return next(s for s in planner.param_inventory(TINY) if s.name == name)


def test_tp_shards_the_dense_projections_and_replicates_norms_router_experts():
    expected = {
        "tok_embeddings.weight": 0,  # vocab-parallel embedding
        "output.weight": 0,  # vocab-parallel head
        "layers.0.attention.q_proj.weight": 0,  # column parallel
        "layers.0.attention.v_proj.weight": 0,
        "layers.0.attention.o_proj.weight": 1,  # row parallel
        "layers.0.feed_forward.up_proj.weight": 0,
        "layers.0.feed_forward.down_proj.weight": 1,
        "layers.0.attention_norm.weight": None,  # sequence parallel: replicated
        "layers.1.moe.gate.weight": None,  # the MoE layer runs on the tp rank's tokens
        "layers.1.moe.experts.w_up": None,
        "layers.1.moe.shared_experts.up_proj.weight": None,
        "norm.weight": None,
    }
    assert {name: tp_shard_dim(_spec(name)) for name in expected} == expected


def test_tp_state_bytes_hand_count():
    """tp=2, no FSDP, ep=2 (borrowed from tp): every TP-sharded dense tensor halves, the rest is whole, experts
    split over ep; summed over the 2 ranks: each sharded tensor once, each replicated tensor twice."""
    layout = planner.Layout(1, 1, 1, 2, tp=2)
    inventory = planner.param_inventory(TINY)
    sharded = sum(math.prod(s.shape) for s in inventory if tp_shard_dim(s) is not None)
    replicated = sum(math.prod(s.shape) for s in inventory if tp_shard_dim(s) is None and not s.expert)
    experts = sum(math.prod(s.shape) for s in inventory if s.expert)
    # vocab 259 splits 130 + 129 (torch.chunk): rank 0 holds 130 rows of the embedding and of the head
    rank0 = (sharded - 2 * 259 * D) // 2 + 2 * 130 * D + replicated + experts // 2
    per_rank = [planner.local_param_numel(TINY, layout, rank=r, fsdp=False) for r in range(2)]
    assert per_rank[0]["dense"] + per_rank[0]["expert"] == rank0
    assert sum(p["dense"] for p in per_rank) == sharded + 2 * replicated
    assert sum(p["expert"] for p in per_rank) == experts


def test_tp_collective_bytes_per_layer():
    """Per micro-batch: attention and the dense MLP each all-gather their input and reduce-scatter their output in
    forward, the reverse in backward (4 x [T, D]); embedding and head 2 each; MoE layers none. A ring moves
    (tp - 1)/tp of each."""
    whole = Stage((0, 1, 2, 3))
    assert (
        tp_messages_per_micro_batch(TINY, activation_checkpointing="none", stage=whole) == 4 * 4 + 4 + 2 + 2
    )
    assert (
        tp_messages_per_micro_batch(TINY, activation_checkpointing="full", stage=whole) == 6 * 4 + 6 + 2 + 2
    )
    assert (
        tp_messages_per_micro_batch(TINY, activation_checkpointing="none", stage=Stage((1, 2), False, False))
        == 8
    )
    comm = planner.comm_per_step(TINY, SHAPE, planner.Layout(1, 1, 1, 1, tp=2), planner.ClusterSpec())
    assert comm["tp_activations"]["bytes"] == 24 * (1 / 2) * T * D * A  # 3,145,728 bytes
    # norms (9 x D) and the 3 MoE layers' routers (E x D) and shared experts (3 x D x F_s): all-reduced over tp
    replicated = 9 * D + 3 * (8 * D + 3 * D * 128)
    assert tp_replicated_numel(TINY, whole) == replicated
    assert comm["tp_grad_allreduce"]["bytes"] == 2 * (1 / 2) * A * replicated


def test_tp_activations_hand_count():
    """Sequence parallel: the norms' tensors and the whole MoE layer hold T/tp tokens; attention and the dense
    MLP keep their all-gathered input (T x D) and 1/tp of their heads / hidden features."""
    q, kv, H = 4 * 32, 2 * 32, 4
    for tp in (1, 2):
        gathered = D if tp > 1 else 0
        attn = A * (2 * D / tp + gathered + (4 * q + 3 * kv) / tp) + 4 * H / tp
        assert planner.attention_bytes_per_token(TINY, A, tp=tp) == pytest.approx(attn)
        dense = A * (2 * D / tp + gathered + 4 * 512 / tp)
        assert planner.ffn_bytes_per_token(TINY, 0, A, tp=tp) == pytest.approx(dense)
        moe_tp1 = planner.ffn_bytes_per_token(TINY, 1, A) - A * 2 * D
        assert planner.ffn_bytes_per_token(TINY, 1, A, tp=tp) == pytest.approx((A * 2 * D + moe_tp1) / tp)


def test_tp_layouts_follow_the_heads_and_borrow_ep_from_tp():
    cluster = planner.ClusterSpec(gpus_per_node=8)
    shape = planner.TrainingShape(global_batch=8, micro_batch=1, seq_len=128)
    with pytest.raises(ValueError, match="num_kv_heads=2 is not divisible by parallel.tp=4"):
        planner.plan_layout(TINY, shape, planner.Layout(1, 2, 1, 1, tp=4), cluster)
    with pytest.raises(ValueError, match="ep=8 must divide dp_shard\\*cp\\*tp = 2\\*1\\*2 = 4"):
        planner.plan_layout(TINY, shape, planner.Layout(1, 2, 1, 8, tp=2), cluster)
    p = planner.plan_layout(
        TINY, shape, planner.Layout(1, 2, 1, 4, tp=2), cluster
    )  # ep 4 = dp_shard 2 x tp 2
    assert p.layout.ep_shard == 1 and p.micro_batches == 4
    names = {layout.name() for layout in planner.candidate_layouts(4, tp_degrees=(1, 2))}
    assert {"rep1-shard2-cp1-ep4-tp2", "rep1-shard4-cp1-ep4"} <= names

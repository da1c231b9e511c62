"""Planner tensor-parallel terms (`apply_tp`: Megatron TP + sequence parallel) against hand counts on the tiny
model."""

import math

import pytest

from automoe import planner
from automoe.planner.comm import tp_message_width, tp_norm_numel
from automoe.planner.memory import Stage, is_tp_param, tp_shard_dim

# tiny: D=128, 4 blocks (block 0 dense, F=512), H=4 heads of 32, 2 kv heads, E=8, K=2, F_moe=128, one shared expert
TINY = planner.load_model_config("tiny")
SHAPE = planner.TrainingShape(global_batch=4, micro_batch=4, seq_len=128, compute_dtype="float32", fsdp=False)
T, D, A, V = 4 * 128, 128, 4, 259


def _spec(name):
    return next(s for s in planner.param_inventory(TINY) if s.name == name)


def test_tp_shards_the_dense_projections_and_replicates_norms_router_experts():
    """The placements of `automoe.parallel.tensor_parallel.apply_tp`'s plan."""
    expected = {  # name: (shard dim or None, a DTensor on the tp axis)
        "tok_embeddings.weight": (0, True),  # vocab-parallel embedding (RowwiseParallel on nn.Embedding)
        "output.weight": (0, True),  # column-parallel head
        "layers.0.attention.q_proj.weight": (0, True),
        "layers.0.attention.v_proj.weight": (0, True),
        "layers.0.attention.o_proj.weight": (1, True),  # row parallel
        "layers.0.feed_forward.up_proj.weight": (0, True),
        "layers.0.feed_forward.down_proj.weight": (1, True),
        "layers.0.attention_norm.weight": (None, True),  # sequence parallel: replicated DTensor
        "norm.weight": (None, True),
        "layers.1.moe.gate.weight": (
            None,
            False,
        ),  # the MoE layer runs on the tp rank's tokens: plain tensors
        "layers.1.moe.experts.w_up": (None, False),
        "layers.1.moe.shared_experts.up_proj.weight": (None, False),
    }
    got = {name: (tp_shard_dim(_spec(name)), is_tp_param(_spec(name))) for name in expected}
    assert got == expected


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
    forward, the reverse in backward (4 x [T, D]); embedding 2, head 2 plus its logits all-gathered ([T, V]); MoE
    layers none. A ring moves (tp - 1)/tp of each."""
    whole = Stage((0, 1, 2, 3))
    assert tp_message_width(TINY, activation_checkpointing="none", stage=whole) == (4 * 4 + 4 + 2 + 2) * D + V
    assert tp_message_width(TINY, activation_checkpointing="full", stage=whole) == (6 * 4 + 6 + 2 + 2) * D + V
    assert tp_message_width(TINY, activation_checkpointing="none", stage=Stage((1, 2), False, False)) == 8 * D
    comm = planner.comm_per_step(TINY, SHAPE, planner.Layout(1, 1, 1, 1, tp=2), planner.ClusterSpec())
    assert comm["tp_activations"]["bytes"] == (1 / 2) * T * (24 * D + V) * A  # 3,410,944 bytes
    # the 9 norm weights (8 in blocks, the final one): partial gradients all-reduced over tp per micro-batch
    assert tp_norm_numel(TINY, whole) == 9 * D
    assert comm["tp_grad_allreduce"]["bytes"] == 2 * (1 / 2) * A * 9 * D
    # without FSDP, at the step's end: tp DTensors over their replicas (none here), MoE plain tensors over the
    # stage's 2 ranks: routers (E x D) and shared experts (3 x D x F_s) of 3 MoE layers
    assert "dense_allreduce" not in comm
    assert comm["moe_dense_allreduce"]["bytes"] == 2 * (1 / 2) * 4 * 3 * (8 * D + 3 * D * 128)


def test_tp_activations_hand_count():
    """Sequence parallel: the norms' tensors and the whole MoE layer hold T/tp tokens; attention and the dense
    MLP keep their all-gathered input (T x D) and 1/tp of their heads / hidden features."""
    q, kv, H = 4 * 32, 2 * 32, 4
    norm = 4 * D + 4 + A * D  # fp32 input (the input itself in fp32), 1/rms, normalized tensor
    for tp in (1, 2):
        # input of q/k/v (gathered under tp); q, k after RoPE, v, SDPA output; fp32 log-sum-exp per head
        attn = norm / tp + A * D + (A * (2 * q + 2 * kv) + 4 * H) / tp
        assert planner.attention_bytes_per_token(TINY, A, tp=tp) == pytest.approx(attn)
        dense = norm / tp + A * (D + 4 * 512 / tp)
        assert planner.ffn_bytes_per_token(TINY, 0, A, tp=tp) == pytest.approx(dense)
        moe_tp1 = planner.ffn_bytes_per_token(TINY, 1, A)
        assert planner.ffn_bytes_per_token(TINY, 1, A, tp=tp) == pytest.approx(moe_tp1 / tp)
    # the head: its norm (sequence-sharded), its gathered input, whole-vocabulary fp32 log-softmax, the labels
    act = planner.activation_bytes(TINY, SHAPE, planner.Layout(1, 1, 1, 1, tp=2))
    assert act["head"] == T * (norm / 2 + A * D + 4 * V + 8)


def test_tp_layouts_refused_like_training():
    cluster = planner.ClusterSpec(gpus_per_node=8)
    shape = planner.TrainingShape(global_batch=8, micro_batch=1, seq_len=128, fsdp=False)
    with pytest.raises(ValueError, match="num_kv_heads=2 is not divisible by parallel.tp=4"):
        planner.plan_layout(TINY, shape, planner.Layout(1, 2, 1, 1, tp=4), cluster)
    with pytest.raises(ValueError, match="parallel.ep=8 must divide dp_shard\\*cp\\*tp = 2\\*1\\*2 = 4"):
        planner.plan_layout(TINY, shape, planner.Layout(1, 2, 1, 8, tp=2), cluster)
    with pytest.raises(ValueError, match="data.seq_len=129 is not divisible by parallel.cp\\*tp = 1\\*2"):
        odd = planner.TrainingShape(global_batch=8, micro_batch=1, seq_len=129, fsdp=False)
        planner.plan_layout(TINY, odd, planner.Layout(1, 1, 1, 2, tp=2), cluster)
    p = planner.plan_layout(
        TINY, shape, planner.Layout(1, 2, 1, 4, tp=2), cluster
    )  # ep 4 = dp_shard 2 x tp 2
    assert p.layout.ep_shard == 1 and p.micro_batches == 4
    names = {layout.name() for layout in planner.candidate_layouts(4, tp_degrees=(1, 2))}
    assert {"rep1-shard2-cp1-ep4-tp2", "rep1-shard4-cp1-ep4"} <= names

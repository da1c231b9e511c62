"""Index math and the local dispatcher against plain Python references."""

import torch

from automoe.moe.dispatch import LocalDispatcher
from automoe.moe.index import capacity_keep_mask, count_per_expert, flat_slots, sort_by_expert
from tests.tolerance import assert_close_rounding


def test_sort_by_expert_is_stable_and_counts_match():
    idx = torch.tensor([3, 1, 3, 0, 1, 4, 3])  # 4 = invalid sentinel for E=4
    order, counts = sort_by_expert(idx, 4)
    assert order.tolist() == [3, 1, 4, 0, 2, 6, 5]
    assert counts.tolist() == [1, 2, 0, 3]


def test_flat_slots_marks_invalid_with_sentinel():
    idx = torch.tensor([[0, 2], [1, 3]])
    valid = torch.tensor([[True, False], [True, True]])
    assert flat_slots(idx, valid, 4).tolist() == [0, 4, 1, 3]


def test_count_per_expert_skips_invalid_tokens():
    idx = torch.tensor([[0, 1], [1, 2], [2, 3]])
    valid = torch.tensor([True, False, True])
    assert count_per_expert(idx, valid, 4).tolist() == [1.0, 1.0, 1.0, 1.0]


def _capacity_reference(idx, w, valid, E, cap):
    T, K = idx.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        slots = [(t, k) for t in range(T) for k in range(K) if idx[t, k] == e and (valid is None or valid[t])]
        slots.sort(key=lambda s: (-w[s].item(), s[0] * K + s[1]))
        for s in slots[:cap]:
            keep[s] = True
    return keep


def test_capacity_keeps_highest_weights_per_expert():
    g = torch.Generator().manual_seed(0)
    T, K, E = 40, 2, 5
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g).round(decimals=1)  # ties exercise the position tie-break
    valid = torch.rand(T, generator=g) > 0.2
    for cap in (0, 3, 7, 100):
        got = capacity_keep_mask(idx, w, valid, E, cap)
        assert torch.equal(got, _capacity_reference(idx, w, valid, E, cap)), cap


def test_local_dispatch_combine_matches_loop_and_gradients():
    g = torch.Generator().manual_seed(1)
    T, K, E, D = 12, 3, 5, 4
    x = torch.randn(T, D, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, requires_grad=True)
    valid = torch.ones(T, K, dtype=torch.bool)
    valid[2, 1] = valid[5] = False
    scale = torch.arange(1.0, E + 1)

    disp = LocalDispatcher(E)
    x_ND, counts, ctx = disp.dispatch(x, idx, w, valid)
    assert counts.tolist() == [int(((idx == e) & valid).sum()) for e in range(E)]
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
    y = disp.combine(x_ND * scale[expert_of_row, None], ctx)

    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            if valid[t, k]:
                ref[t] += w[t, k] * scale[idx[t, k]] * x[t]
    # the K-slot sum in another order, each term a triple product rounded in another order: 2 stages of K terms
    assert_close_rounding(y, ref, terms=K, depth=2)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
    # that forward, then backward sums over the K slots (x) or the D features (w): 3 stages of <= max(K, D) terms
    assert_close_rounding(gx, rx, terms=max(K, D), depth=3)
    assert_close_rounding(gw, rw, terms=max(K, D), depth=3)
    assert gw[5].abs().sum() == 0 and gw[2, 1] == 0


def test_rank_pairs_returns_what_it_annotates():
    """Token 0 routes to experts 0 and 1 (both on rank 0): one pair; token 1 to experts 1 and 2: two pairs."""
    from typing import get_args, get_type_hints

    from automoe.moe.index import rank_pairs

    indices_TK = torch.tensor([[0, 1], [1, 2]])
    out = rank_pairs(indices_TK, None, experts_per_rank=2, num_ranks=2)
    assert len(out) == len(get_args(get_type_hints(rank_pairs)["return"]))
    token_M, dest_M, counts_X, local_MK, hit_MK = out
    assert token_M.tolist() == [0, 1, 1] and dest_M.tolist() == [0, 0, 1] and counts_X.tolist() == [2, 1]
    assert local_MK.tolist() == [[0, 1], [1, -1], [-1, 0]]
    assert torch.equal(hit_MK, local_MK >= 0)


def test_grouped_engine_offsets_are_the_index_helper():
    """One definition of the grouped-GEMM end offsets, in the index module, used by the experts."""
    from automoe.moe import experts, index

    assert experts.expert_offsets is index.expert_offsets
    counts_E = torch.tensor([3, 0, 2])
    assert index.expert_offsets(counts_E).tolist() == [3, 3, 5]
    assert index.expert_offsets(counts_E).dtype == torch.int32

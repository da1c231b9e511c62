"""Slot-grid permutations: values against index_select / index_add, gradients by gradcheck."""

import torch

from automoe.moe.permute import expand_rows, weighted_collapse
from tests.tolerance import assert_close_rounding, assert_equal


def _case(R=5, K=3, D=4, drop=(1, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(R * K, generator=g)
    slot_N = slots[~torch.isin(slots, torch.tensor(drop))]
    x = torch.randn(R, D, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(len(slot_N), D, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(R, K, dtype=torch.float64, generator=g, requires_grad=True)
    return slot_N, x, y, w, K


def test_expand_rows_values_and_gradcheck():
    slot_N, x, _, _, K = _case()
    assert_equal(expand_rows(x, slot_N, slots_per_row=K), x[slot_N // K])  # row copies
    assert torch.autograd.gradcheck(lambda t: expand_rows(t, slot_N, slots_per_row=K), (x,))


def test_weighted_collapse_values_and_gradcheck():
    slot_N, _, y, w, K = _case()
    R = w.shape[0]
    ref = torch.zeros(R, y.shape[1], dtype=y.dtype).index_add(0, slot_N // K, y * w.reshape(-1)[slot_N, None])
    assert_close_rounding(weighted_collapse(y, slot_N, w), ref, terms=K)  # a K-slot bmm vs index_add, fp64
    assert torch.autograd.gradcheck(lambda a, b: weighted_collapse(a, slot_N, b), (y, w))


def test_empty_inputs():
    x = torch.randn(0, 4, requires_grad=True)
    out = expand_rows(x, torch.zeros(0, dtype=torch.long), slots_per_row=2)
    assert out.shape == (0, 4)
    y = weighted_collapse(torch.randn(0, 4), torch.zeros(0, dtype=torch.long), torch.rand(3, 2))
    assert_equal(y, torch.zeros(3, 4))  # no slots: exact zeros


def test_mixed_precision_gradients_keep_input_dtypes():
    slot_N = torch.tensor([3, 0, 2])
    y = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(2, 2, requires_grad=True)  # fp32 weights, bf16 rows (the layer under autocast)
    out = weighted_collapse(y, slot_N, w)
    out.float().sum().backward()
    assert y.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    x = torch.randn(2, 4, dtype=torch.bfloat16, requires_grad=True)
    expand_rows(x, slot_N, slots_per_row=2).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16

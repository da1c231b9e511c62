"""The suite's tolerance rule holds for real reorderings and still catches a real error."""

import pytest
import torch

from tests.tolerance import assert_close_rounding, rounding_atol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reordered_sums_stay_within_the_bound_and_a_lost_term_does_not(dtype):
    g = torch.Generator().manual_seed(0)
    n = 1000
    x = (torch.randn(64, n, generator=g) * torch.logspace(-3, 3, n)).to(dtype)  # wide magnitudes: hard case
    forward = x.cumsum(dim=1, dtype=dtype)[:, -1]  # sequential, left to right
    backward = x.flip(1).cumsum(dim=1, dtype=dtype)[:, -1]  # sequential, right to left
    blocked = x.view(64, 40, 25).sum(dim=2, dtype=dtype).sum(dim=1, dtype=dtype)  # a blocked tree
    scale = x.float().abs().sum(dim=1).max()  # Higham's sum|term|
    for other in (backward, blocked):
        assert_close_rounding(other, forward, terms=n, scale=scale)


def test_an_error_of_one_term_fails():
    """A lost or doubled term of the largest size is a bug the rule sees (fp32, n = 1000: atol = 1.2e-4 x term)."""
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1))
    total = x.sum(dim=1)
    big = x.abs().max()
    with pytest.raises(AssertionError, match="terms=1000"):
        assert_close_rounding(total + big, total, terms=1000, scale=big)


def test_the_tolerance_grows_with_length_depth_and_scale():
    base = rounding_atol(torch.float32, terms=100, scale=1.0)
    assert base == pytest.approx(2 * 100 * torch.finfo(torch.float32).eps / 2)
    assert rounding_atol(torch.float32, terms=200, scale=1.0) == pytest.approx(2 * base)
    assert rounding_atol(torch.float32, terms=100, scale=1.0, depth=3) == pytest.approx(3 * base)
    assert rounding_atol(torch.float32, terms=100, scale=torch.tensor([-4.0, 2.0])) == pytest.approx(4 * base)
    assert rounding_atol(torch.bfloat16, terms=100, scale=1.0) == pytest.approx(base * 2**16)


def test_empty_tensors_compare_and_have_no_scale():
    """A rank that received no rows compares empty outputs: nothing to bound, no error."""
    empty = torch.zeros(0, 4)
    assert rounding_atol(torch.float32, terms=10, scale=empty) == rounding_atol(
        torch.float32, terms=10, scale=0.0
    )
    assert_close_rounding(empty, empty.clone(), terms=10)

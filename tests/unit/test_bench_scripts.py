"""Benchmark scripts on tiny problems: what they time runs, and their inputs are what they say."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_script_defaults import load_script


def test_routed_counts_balanced_and_skewed():
    script = load_script("bench_expert_layouts")
    assert script._routed_counts(4, 2, 8, tokens=64, dim=16, noise=0.0) == [32] * 4
    skewed = script._routed_counts(4, 2, 8, tokens=64, dim=16, noise=1.0)
    assert sum(skewed) == 128 and len(skewed) == 4 and skewed != [32] * 4


def test_every_formulation_runs_on_ragged_rows_with_an_empty_expert():
    script = load_script("bench_expert_layouts")
    for dtype in (torch.float32, torch.bfloat16):
        fns = script._formulations([5, 0, 11], D=16, Fd=8, dtype=dtype)
        assert {"per_expert_in_out", "per_expert_out_in", "padded_bmm", "floor_in_out"} <= set(fns)
        for fn in fns.values():
            fn()


def test_row_count_bench_times_every_case_and_rejects_a_too_small_dim():
    script = load_script("bench_gemm_row_counts")
    ms = script.measure(torch.float32, dim=64, calls=8, rounds=2)
    assert set(ms) == {"one_count", "new_counts", "same_counts_again"} and min(ms.values()) > 0
    with pytest.raises(ValueError, match="--dim"):
        script.measure(torch.float32, dim=16, calls=8, rounds=5)

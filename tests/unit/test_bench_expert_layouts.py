"""scripts/bench_expert_layouts.py: the routed row counts it times and every formulation, on a tiny problem."""

from __future__ import annotations

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

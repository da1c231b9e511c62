"""The pretrain recipe with tensor x expert parallelism (`parallel=tp2_ep2`, 2 processes): every token routed once
(sequence-parallel MoE), validation and checkpoints under TP, and a resume at `parallel=ep2` (no TP, FSDP) that
continues the run within fp tolerance."""

from __future__ import annotations

import shutil

import pytest

from automoe.train.checkpoint import MARKER
from automoe.train.metrics import read_metrics
from tests.integration.recipe import check_ok, run_recipe

pytestmark = pytest.mark.integration

TOL = 1e-5  # relative, per step: the same math with other reduction orders (fp32 rounding is ~1e-7)


@pytest.mark.timeout(240)
def test_tp2_ep2_routes_each_token_once_and_reshards_to_ep2(tmp_path):
    full = tmp_path / "full"
    args = ("train.steps=4", "train.val_interval=4", "checkpoint.interval=2")
    check_ok(run_recipe(2, full, "parallel=tp2_ep2", *args))
    records = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # global batch 8 x seq_len 64 tokens, top-2: each tp rank routed its own half once
        assert all(sum(m["load"]) == 8 * 64 * 2 for m in r["moe"].values())
    assert "val_loss" in records[-1]
    assert (full / "checkpoints" / "step_2" / MARKER).is_file()
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_2", part / "checkpoints" / "step_2")
    check_ok(run_recipe(2, part, "parallel=ep2", *args, "checkpoint.resume=latest"))
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(records[2:], resumed):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 2 * TOL * abs(a[key]), (
                f"step {a['step']} {key}: {a[key]} vs {b[key]}"
            )
        # integer loads: the resumed weights route exactly as the uninterrupted run's
        assert {n: m["load"] for n, m in a["moe"].items()} == {n: m["load"] for n, m in b["moe"].items()}

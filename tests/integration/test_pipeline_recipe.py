"""The pretrain recipe with pipeline x expert parallelism (`parallel=pp2_ep2`, 4 processes): every stage's MoE
layers in rank 0's metrics, validation and checkpoints under PP, and a resume equal to the uninterrupted run."""

from __future__ import annotations

import shutil

import pytest

from automoe.train.checkpoint import MARKER
from automoe.train.metrics import read_metrics
from tests.integration.recipe import check_ok, run_recipe

pytestmark = pytest.mark.integration

LOOP_KEYS = ("loss", "aux_loss", "grad_norm", "lr")


@pytest.mark.timeout(240)
def test_pp2_ep2_trains_validates_checkpoints_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    args = ("parallel=pp2_ep2", "train.steps=4", "train.val_interval=4", "checkpoint.interval=2")
    check_ok(run_recipe(4, full, *args, "logging.heatmap=true"))
    records = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # stage 0 holds blocks 0-1, stage 1 blocks 2-3: both stages' MoE layers reach rank 0
        assert list(r["moe"]) == ["layers.1.moe", "layers.2.moe", "layers.3.moe"]
        assert all(sum(m["load"]) == 8 * 64 * 2 for m in r["moe"].values())
    assert "val_loss" in records[-1]
    assert (full / "checkpoints" / "step_2" / MARKER).is_file()
    assert (full / "expert_load_heatmap.png").stat().st_size > 1000
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_2", part / "checkpoints" / "step_2")
    check_ok(run_recipe(4, part, *args, "checkpoint.resume=latest"))
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(records[2:], resumed):
        assert {k: a[k] for k in LOOP_KEYS} == {k: b[k] for k in LOOP_KEYS}, f"step {a['step']}"
        assert {n: m["load"] for n, m in a["moe"].items()} == {n: m["load"] for n, m in b["moe"].items()}

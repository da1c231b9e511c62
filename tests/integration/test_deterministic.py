"""`train.deterministic=true` (issue 16, item 5): two runs of the same command on the same machine and layout
(world 2, EP=2 + FSDP2, gradient accumulation, aux loss and gate-bias update on) give bitwise equal per-step
metrics for 20 steps and bitwise equal checkpoints (every tensor of model, optimizer and gate biases).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from automoe.train.metrics import read_metrics
from tests.integration.recipe import check_ok, run_recipe

pytestmark = pytest.mark.integration

STEPS = 20
JOB = (
    "train.deterministic=true",
    f"train.steps={STEPS}",
    "checkpoint.interval=10",
    "checkpoint.keep_last_n=0",
    # a smaller tiny model: 20 steps in a few seconds
    "model.dim=64",
    "model.num_layers=3",
    "model.ffn_inter_dim=128",
    "model.moe.moe_inter_dim=64",
    "model.moe.gate_bias_update_factor=0.001",
    "data.seq_len=32",
)
DROP = ("tokens_per_s", "step_time_s")  # wall-clock measurements


def _tensors(step_dir, tmp_path) -> dict:
    out = tmp_path / f"{step_dir.parent.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), tree


@pytest.mark.timeout(240)
def test_two_deterministic_runs_are_bitwise_equal(tmp_path):
    runs = [check_ok(run_recipe(2, tmp_path / name, *JOB, timeout=110)) for name in ("a", "b")]
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("a", "b"))
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        same = {k: v for k, v in ra.items() if k not in DROP}
        assert same == {k: v for k, v in rb.items() if k not in DROP}, ra["step"]  # floats compared exactly
    assert len({r["loss"] for r in a}) > 1  # it trained
    for step in (10, STEPS):
        dirs = [tmp_path / name / "checkpoints" / f"step_{step}" for name in ("a", "b")]
        ta, tb = (dict(_flat(_tensors(d, tmp_path))) for d in dirs)
        assert ta.keys() == tb.keys() and any(".gate.correction_bias" in k for k in ta)
        for key, value in ta.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, tb[key]) and value.dtype == tb[key].dtype, key
            else:
                assert value == tb[key], key
        for rank in (0, 1):  # the RNG states each rank resumes from
            rng = [json.loads((d / "rng" / f"rank_{rank}.json").read_text()) for d in dirs]
            assert rng[0] == rng[1]
    assert all("train.deterministic=true: deterministic algorithms" in r.output for r in runs)

"""Checkpoints written by earlier automoe versions stay loadable: each committed fixture resumes and reproduces
the loss its writer recorded for the next step (scripts/make_checkpoint_fixture.py wrote them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from automoe.train.metrics import read_metrics
from tests.integration.recipe import check_ok, run_recipe
from tests.tolerance import rounding_atol

pytestmark = pytest.mark.integration

FIXTURES = sorted((Path(__file__).resolve().parents[1] / "fixtures").glob("checkpoint_v*"))


def _resume(fixture: Path, out: Path, *extra: str):
    expected = json.loads((fixture / "expected.json").read_text())
    step = expected["saved_step"]
    shutil.copytree(fixture / f"step_{step}", out / "checkpoints" / f"step_{step}")
    run = run_recipe(
        expected["nproc"],
        out,
        *expected["overrides"],
        "checkpoint.interval=0",
        "checkpoint.resume=latest",
        *extra,
    )
    return expected, run


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_an_old_checkpoint_resumes_to_the_recorded_loss(fixture, tmp_path):
    expected, run = _resume(fixture, tmp_path)
    check_ok(run)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [expected["saved_step"] + 1]
    # The loss of the next step is one forward over the checkpoint's weights and data position, so only the
    # writer's CPU kernels can differ: a chain of 4 reductions per block plus the head, over at most 32 terms
    # (the fixture's widest contraction), of magnitude ~ the loss.
    num_layers = int(
        next(o for o in expected["overrides"] if o.startswith("model.num_layers=")).split("=")[1]
    )
    atol = rounding_atol(torch.float32, terms=32, scale=expected["next_step_loss"], depth=4 * num_layers + 1)
    assert abs(records[0]["loss"] - expected["next_step_loss"]) <= atol, (records[0]["loss"], expected)


@pytest.mark.timeout(60)
def test_a_checkpoint_of_an_unknown_format_names_the_versions(tmp_path):
    fixture = tmp_path / "future"
    shutil.copytree(FIXTURES[-1], fixture)
    state_file = next(fixture.glob("step_*")) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["format"] = 999
    state_file.write_text(json.dumps(state))
    _, run = _resume(fixture, tmp_path / "out")
    assert run.returncode != 0
    assert "format 999" in run.output and "reads format" in run.output, run.output[-3000:]

"""Real processes under torchrun (world 2, EP=2): a rank killed with SIGKILL mid-run and again mid-save is
restarted by `--max-restarts` and the job ends bit-for-bit where an uninterrupted one does; a hung rank ends the
job after `parallel.collective_timeout_s` with a message naming the collective; an injected NaN is skipped by
both ranks alike, then stops the job without a checkpoint of the poisoned step.
"""

from __future__ import annotations

import random

import pytest

from automoe.train.checkpoint import MARKER, latest_checkpoint, step_dirs
from automoe.train.metrics import read_metrics
from tests.reliability.harness import loop_values
from tests.reliability.launch import tail, torchrun

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

RESTART_JOB = (
    "train.steps=8",
    "checkpoint.interval=2",
    "checkpoint.keep_last_n=2",
    "checkpoint.resume=latest",
    "checkpoint.async_save=true",
)


@pytest.mark.timeout(240)
def test_kill9_then_crash_in_async_save_restart_to_identical_end(tmp_path):
    ref = torchrun(2, tmp_path / "ref", *RESTART_JOB)
    assert ref.returncode == 0, tail(ref)
    # Attempt 0: rank 1 is SIGKILLed when a random step begins. Attempt 1: rank 0 dies in the background write
    # of step 6's async save, after its shard, before the metadata. Attempt 2 runs clean.
    kill_step = random.randint(2, 8)
    fault = f"kill_at_step:{kill_step}:1:0;crash_in_save:dcp.after_data@6:0:1"
    run = torchrun(2, tmp_path / "job", *RESTART_JOB, fault=fault, max_restarts=2, timeout=200)
    context = f"kill_at_step={kill_step}\n{tail(run)}"
    assert run.returncode == 0, context
    assert run.output.count("exitcode: -9") == 2, context  # two real deaths, two restarts
    assert run.output.count("world size 2, resolved config") == 3, context  # attempts 0, 1, 2
    expected = loop_values(read_metrics(tmp_path / "ref" / "metrics.jsonl"))
    assert loop_values(read_metrics(tmp_path / "job" / "metrics.jsonl")) == expected, context
    root = tmp_path / "job" / "checkpoints"
    assert [p.name for _, p in step_dirs(root)] == ["step_6", "step_8"] and latest_checkpoint(
        root
    ).name == "step_8"


@pytest.mark.timeout(120)
def test_hung_peer_ends_the_job_after_the_collective_timeout(tmp_path):
    run = torchrun(
        2,
        tmp_path,
        "train.steps=6",
        "parallel.collective_timeout_s=10",
        fault="hang_at_step:3:1",
        timeout=110,
    )
    assert run.returncode != 0, tail(run)
    assert "step 3: a collective in forward/backward" in run.output, tail(run)
    # The job ended itself (not the 110 s subprocess timeout) and says the 10 s collective timeout fired; no
    # wall-clock bound, which would only measure the machine's load.
    assert "parallel.collective_timeout_s=10.0" in run.output, tail(run)


@pytest.mark.timeout(120)
def test_nan_on_one_rank_skipped_by_both_then_stops_without_poisoned_checkpoint(tmp_path):
    run = torchrun(
        2,
        tmp_path,
        "train.steps=5",
        "checkpoint.interval=1",
        "checkpoint.keep_last_n=0",
        "train.nan_policy=skip",
        "train.nan_max_skips=1",
        fault="nan_at_step:3:1;nan_at_step:4:1",  # rank 1's loss only: the global loss is what both ranks see
    )
    assert run.returncode != 0, tail(run)
    for rank in (0, 1):  # each rank logs its own verdict: they agree
        skipped = f"rank{rank}] step 3: non-finite loss=nan or grad_norm=nan; update skipped"
        stopped = f"rank{rank}] step 4: non-finite loss=nan or grad_norm=nan: stopping"
        assert skipped in run.output and stopped in run.output, tail(run)
    assert "NonFiniteError" in run.output and "train.nan_max_skips=1 consecutive steps skipped" in run.output
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["skipped"] for r in records] == [False, False, True] and records[2]["loss"] != records[2][
        "loss"
    ]
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in step_dirs(root)] == ["step_1", "step_2", "step_3"]
    assert all((p / MARKER).is_file() for _, p in step_dirs(root))  # step 3's update was dropped: clean state

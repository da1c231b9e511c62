"""A process killed (SIGKILL) at each point of a checkpoint save, sync and async: `resume=latest` then finds a
complete checkpoint, nothing complete was lost, and the resumed run's losses equal an uninterrupted run's.

One command line serves both attempts (`checkpoint.resume=latest`), as under `torchrun --max-restarts`. Saves at
steps 2, 4, 6 with keep_last_n=1; every fault hits the save of step 4 (whose completion prunes step_2).
"""

from __future__ import annotations

import pytest

from automoe.train.checkpoint import MARKER, latest_checkpoint, step_dirs
from automoe.train.faults import SAVE_POINTS
from automoe.train.metrics import read_metrics
from tests.reliability.harness import loop_values, run_job

pytestmark = pytest.mark.integration

JOB = (
    "checkpoint.interval=2",
    "checkpoint.keep_last_n=1",
    "checkpoint.resume=latest",
    "train.val_interval=0",
)
ASYNC = ("checkpoint.async_save=true",)
# Points after which step_4 is complete (before them, step_2 must still be there, whole).
AFTER_COMPLETE = ("save.marker_written", "prune.marker_removed", "prune.files_half_removed", "prune.done")
SYNC_POINTS = [p for p in SAVE_POINTS if p != "save.async_started"]
ASYNC_POINTS = [
    "dcp.before_data",
    "dcp.data_partial",
    "dcp.after_metadata",
    "save.async_started",
    "save.before_marker",
    "save.marker_written",
    "prune.files_half_removed",
]
CASES = [pytest.param(p, (), id=f"sync-{p}") for p in SYNC_POINTS] + [
    pytest.param(p, ASYNC, id=f"async-{p}") for p in ASYNC_POINTS
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job, uninterrupted (async saving must not change a single value, so one reference serves both)."""
    path = tmp_path_factory.mktemp("reference")
    assert run_job(path, *JOB) == 0
    values = loop_values(read_metrics(path / "metrics.jsonl"))
    assert [v[0] for v in values] == [1, 2, 3, 4, 5, 6]
    return values


def test_every_save_point_is_covered():
    assert len(CASES) >= 25 and set(SYNC_POINTS) | set(ASYNC_POINTS) == set(SAVE_POINTS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point,extra", CASES)
def test_kill_inside_save_then_resume_latest(reference, tmp_path, point, extra):
    root = tmp_path / "checkpoints"
    assert run_job(tmp_path, *JOB, *extra, fault=f"crash_in_save:{point}@4") == -9, "the fault did not fire"

    # 1. what the crash left: a complete checkpoint, and the older one intact until the newer one is complete
    latest = latest_checkpoint(root)
    assert latest is not None
    if point in AFTER_COMPLETE:
        assert latest.name == "step_4"
    else:
        assert latest.name == "step_2"
        assert not (root / "step_4" / MARKER).exists()
    for f in (".metadata", "__0_0.distcp", "trainer_state.json", "config.yaml", "rng/rank_0.json"):
        assert (latest / f).is_file(), f"{latest.name}/{f}"

    # 2. the same command line again: continues from `latest` and reproduces the uninterrupted run exactly
    assert run_job(tmp_path, *JOB, *extra) == 0
    assert loop_values(read_metrics(tmp_path / "metrics.jsonl")) == reference
    assert [p.name for _, p in step_dirs(root)] == ["step_6"]  # leftovers of the crash are pruned

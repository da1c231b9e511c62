"""`automoe.train.faults` spec parsing and targeting, and the finite timeout of every process group a job makes."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from automoe.train import faults
from tests.integration.recipe import REPO, TORCHRUN


@pytest.fixture(autouse=True)
def no_faults():
    yield
    faults.configure(None)


def test_spec_parses_kinds_ranks_and_attempts():
    got = faults.parse("kill_at_step:5:1; crash_in_save:dcp.after_data@6:0:1;nan_at_step:3:*;hang_at_step:2")
    assert got == [
        faults.Fault("kill_at_step", 5, None, 1, 0),
        faults.Fault("crash_in_save", 6, "dcp.after_data", 0, 1),
        faults.Fault("nan_at_step", 3, None, None, 0),
        faults.Fault("hang_at_step", 2, None, None, 0),
    ]
    assert faults.parse("crash_in_save:save.begin") == [
        faults.Fault("crash_in_save", None, "save.begin", None, 0)
    ]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("explode:3", "is not kind:arg"),
        ("kill_at_step:x", "non-integer"),
        ("crash_in_save:nowhere@2", "'nowhere'"),
    ],
)
def test_bad_spec_is_named(spec, match):
    with pytest.raises(faults.FaultSpecError, match=match):
        faults.parse(spec)


def test_faults_fire_only_for_their_rank_step_and_attempt():
    faults.configure("nan_at_step:3:1;crash_in_save:save.begin@4", rank=1, attempt=0)
    assert faults.poison_loss(3) and not faults.poison_loss(4)
    assert faults.wants_save_point("save.begin", 4) and not faults.wants_save_point("save.begin", 2)
    faults.configure("nan_at_step:3:1", rank=0)
    assert not faults.poison_loss(3)
    faults.configure("nan_at_step:3:1:1", rank=1, attempt=0)  # meant for the first restart
    assert not faults.poison_loss(3)
    faults.configure("nan_at_step:3:1:1", rank=1, attempt=1)
    assert faults.poison_loss(3)
    faults.configure(None)
    assert not faults.poison_loss(3) and not faults.wants_save_point("save.begin", 4)
    faults.at_step(3)  # no fault set: returns


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_every_process_group_gets_the_configured_timeout():
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc-per-node=2",
        str(REPO / "tests/reliability/timeout_probe.py"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r"rank(\d) (\w+) timeout (\S+)s", proc.stdout)
    assert len(found) == 8, proc.stdout
    assert {t for _, _, t in found} == {"7"}, proc.stdout  # c10d's own default for gloo sub-groups is 1800 s

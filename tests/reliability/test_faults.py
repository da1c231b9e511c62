"""`automoe.train.faults` spec parsing and targeting, and the finite timeout of every process group a job makes."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from automoe.torchrun import torchrun_command
from automoe.train import faults
from tests.integration.recipe import REPO


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


def poisons(hooks: faults.FaultHooks, step: int) -> bool:
    return bool(hooks.poison_loss(torch.ones(()), step).isnan())


def test_faults_fire_only_for_their_rank_step_and_attempt():
    hooks = faults.from_spec("nan_at_step:3:1;crash_in_save:save.begin@4", rank=1, attempt=0)
    assert poisons(hooks, 3) and not poisons(hooks, 4)
    assert hooks.crashes_at("save.begin", 4) and not hooks.crashes_at("save.begin", 2)
    assert not poisons(faults.from_spec("nan_at_step:3:1", rank=0), 3)
    assert not poisons(
        faults.from_spec("nan_at_step:3:1:1", rank=1, attempt=0), 3
    )  # meant for the first restart
    assert poisons(faults.from_spec("nan_at_step:3:1:1", rank=1, attempt=1), 3)
    none = faults.from_spec(None)
    assert isinstance(none, faults.NullFaults)
    assert not poisons(none, 3) and not none.crashes_at("save.begin", 4)
    none.at_step(3)  # no fault set: returns
    none.at("save.begin", 4, damage=lambda: pytest.fail("NullFaults ran the damage"))


def test_from_env_reads_spec_and_restart_count(monkeypatch):
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert isinstance(faults.from_env(rank=1), faults.NullFaults)
    monkeypatch.setenv(faults.ENV_VAR, "nan_at_step:3:1:1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert poisons(faults.from_env(rank=1), 3) and not poisons(faults.from_env(rank=0), 3)


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_every_process_group_gets_the_configured_timeout():
    cmd = torchrun_command(2, REPO / "tests/reliability/timeout_probe.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r"rank(\d) (\w+) timeout (\S+)s", proc.stdout)
    assert len(found) == 8, proc.stdout
    assert {t for _, _, t in found} == {"7"}, proc.stdout  # c10d's own default for gloo sub-groups is 1800 s


def test_skip_collective_fires_for_its_rank_and_step_after_waiting():
    hooks = faults.from_spec("skip_collective:3:1", rank=1)
    assert faults.parse("skip_collective:3:1") == [faults.Fault("skip_collective", 3, None, 1, 0)]
    assert not hooks.skips_collective(2, wait_s=60)  # another step: no wait, no skip
    assert not faults.from_spec("skip_collective:3:1", rank=0).skips_collective(3, wait_s=60)
    assert hooks.skips_collective(3, wait_s=0.01)
    assert not faults.NullFaults().skips_collective(3)

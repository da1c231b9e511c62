"""Suite-wide fixtures, and an opt-in per-test time record."""

import json
import os
import resource
import time

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch_per_test():
    """Every test starts from the same torch global RNG state, whatever ran before it.

    pytest-randomly reseeds `random` and numpy per test but not torch: without this a test drawing from torch's
    global generator without seeding would see values that depend on which tests ran earlier (an order
    dependence). Tests that need particular draws still seed themselves or pass a Generator.
    """
    torch.manual_seed(0)


_TIMES = os.environ.get("AUTOMOE_TEST_TIMES")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With AUTOMOE_TEST_TIMES=path, append {test, wall_s, cpu_s} per test to that JSON-lines file.

    cpu_s counts this process, every child it reaped (torchrun, spawned ranks) and what its live children (a
    forkserver and the ranks it forked and reaped) used meanwhile: unlike wall time it barely moves when other work
    shares the cores, so the suite's budget can be read on a busy machine.
    """
    if not _TIMES:
        yield
        return
    before = _cpu_seconds(), time.perf_counter()
    yield
    cpu, wall = _cpu_seconds() - before[0], time.perf_counter() - before[1]
    with open(_TIMES, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}) + "\n")


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _live_children_seconds()


def _live_children_seconds() -> float:
    """CPU time of this process's live children and the children they reaped (/proc: utime stime cutime cstime).

    A child reaped during a test moves from here into RUSAGE_CHILDREN with its whole time, so differences stay
    exact. Linux only; elsewhere 0.
    """
    total, me = 0, str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # fields[0] is the state, [1] the parent pid, [11:15] utime stime cutime cstime
            total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")

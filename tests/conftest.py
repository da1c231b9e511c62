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

    cpu_s counts this process and every child it reaped (torchrun, spawned ranks): unlike wall time it barely
    moves when other work shares the cores, so the suite's budget can be read on a busy machine.
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
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

"""train.host_allocator: `cached` keeps freed large CPU blocks mapped, so a tensor allocated every step stops
page-faulting on every page every step; `system` keeps glibc's defaults (a block of 32 MiB or more is a fresh mmap each time).
Counted in minor page faults (exact), not in time; each mode runs in its own process (mallopt is process-wide)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

import pytest

from automoe.config.job import TrainConfig
from automoe.host_memory import TCACHE_OFF, apply_host_allocator, tcache_hint

_FAULTS = """
import json, resource, sys, torch
from automoe.host_memory import TCACHE_OFF, apply_host_allocator, tcache_hint
print(apply_host_allocator(sys.argv[1]), file=sys.stderr)
x = torch.ones(8 * 2**20, requires_grad=True)  # 32 MiB
faults = []
for _ in range(12):  # a training step whose activations and gradients are 32 MiB tensors
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x.grad = None
    (x * 2).sin().sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps(faults))
"""
_PAGES_32MIB = 32 * 2**20 // 2**21  # the fewest faults a fresh 32 MiB mapping can take (2 MiB huge pages)
glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


def _faults_per_step(mode: str) -> list[int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        env.pop(var, None)  # the child must start from glibc's own defaults
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
@pytest.mark.timeout(240)
def test_cached_reuses_mapped_pages_where_system_faults_every_step():
    system, cached = _faults_per_step("system"), _faults_per_step("cached")
    assert min(system[-6:]) >= _PAGES_32MIB, system  # the cost being removed: fresh mappings every step
    # steady state: freed blocks are reused, already mapped. The heap may still grow once in a while (a request
    # that fits no freed block extends it: one 32 MiB tensor's pages), so bound the last 6 steps together.
    assert statistics.median(cached[-6:]) < _PAGES_32MIB, cached
    assert sum(cached[-6:]) < min(system[-6:]), (cached, system)


def test_unknown_mode_names_the_setting():
    with pytest.raises(ValueError, match="train.host_allocator"):
        apply_host_allocator("jemalloc")
    with pytest.raises(ValueError, match="train.host_allocator"):
        TrainConfig(host_allocator="jemalloc")


def test_cached_suggests_turning_glibc_tcache_off_unless_it_is(monkeypatch):
    # the hint alone: applying `cached` here would change this test process's malloc for the rest of the suite
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert f"export GLIBC_TUNABLES={TCACHE_OFF}" in tcache_hint()
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.trim_threshold=0:{TCACHE_OFF}")
    assert tcache_hint() == ""

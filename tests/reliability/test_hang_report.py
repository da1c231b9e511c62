"""A hang says where it is (issue 16, item 6): when a collective fails, every rank writes `hang_rank<r>.json` with
its step, phase and recent collectives, and comparing them names the collective where a rank diverged.

World 2, EP=2 + FSDP2, the real recipe. Rank 1 leaves out the gate-bias load all-reduce of step 3 (fault
`skip_collective:3:1`) and runs on into step 4; rank 0 waits in that all-reduce until the collective timeout.
Each rank is its own process, started without torchrun, as ranks on different nodes are: one rank's failure does
not kill the other before it has reported (a single-node torchrun would).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from automoe.parallel.flight_recorder import first_disagreement, read_hang_reports, summarize
from tests.integration.recipe import FAST, REPO

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

TIMEOUT_S = 8
GATE_BIAS_PHASE = "gate-bias load all-reduce"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(
    world: int, output_dir, *overrides: str, fault: str, timeout: float
) -> list[tuple[int, str]]:
    """`python recipes/pretrain.py` once per rank (RANK/WORLD_SIZE/MASTER_* set by hand); -> (exit code, output)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "AUTOMOE_FAULT": fault,
        }
        cmd = [
            sys.executable,
            str(REPO / "recipes" / "pretrain.py"),
            *FAST,
            f"output_dir={output_dir}",
            *overrides,
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out))
    return results


@pytest.mark.timeout(240)
def test_a_rank_that_skips_a_collective_is_named_by_the_hang_reports(tmp_path):
    results = launch_ranks(
        2,
        tmp_path,
        "train.steps=6",
        f"parallel.collective_timeout_s={TIMEOUT_S}",
        fault="skip_collective:3:1",
        timeout=200,
    )
    context = "\n".join(f"--- rank {r} (exit {rc}) ---\n{out[-3000:]}" for r, (rc, out) in enumerate(results))
    assert all(rc != 0 for rc, _ in results), context
    for rank, (_, out) in enumerate(results):
        assert "CollectiveError" in out and f"hang_rank{rank}.json" in out, context
    reports = read_hang_reports(tmp_path)
    assert sorted(reports) == [0, 1], context
    r0, r1 = reports[0], reports[1]
    # rank 0 waits in step 3's gate-bias all-reduce: its last collective, never completed
    assert (r0["step"], r0["phase"]) == (3, GATE_BIAS_PHASE)
    assert "timed out" in r0["error"].lower() or "timeout" in r0["error"].lower(), r0["error"]
    group = next(g for g, e in r0["last_per_group"].items() if e["phase"] == GATE_BIAS_PHASE)
    pending = r0["last_per_group"][group]
    assert (pending["op"], pending["dtype"], pending["state"], pending["step"]) == (
        "all_reduce (sum over ranks)",
        "int64",
        "issued",
        3,
    )
    # rank 1 left that all-reduce out and went on into step 4
    assert r1["step"] == 4 and r1["phase"].startswith("forward/backward"), (r1["step"], r1["phase"])
    assert not [e for e in r1["collectives"] if e["step"] == 3 and e["phase"] == GATE_BIAS_PHASE]
    # the two ranks' n-th collective on that group differ: the flight recorder's comparison finds it
    n, calls = first_disagreement(reports, group)
    assert n == pending["group_seq"]
    assert calls[0] == pending and (calls[1]["step"], calls[1]["phase"]) == (4, r1["phase"])
    text = summarize(reports)
    assert f"DIVERGED at collective #{n} of this group" in text, text
    # before it, every blocking collective of that group returned (the autograd all-to-alls are only issued)
    earlier = [e for e in r0["collectives"] if e["group"] == group and e["group_seq"] < n]
    assert earlier and all(e["state"] == "completed" for e in earlier if "autograd" not in e["op"])
    cli = subprocess.run(
        [sys.executable, "-m", "automoe.parallel.flight_recorder", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and f"DIVERGED at collective #{n}" in cli.stdout, cli.stdout + cli.stderr

"""The collective flight recorder without processes: per-group sequence numbers, the ring buffer, the report file
and the comparison that finds the collective where two ranks diverged (the end-to-end hang is
`tests/reliability/test_hang_report.py`)."""

from __future__ import annotations

import torch

from automoe.parallel.flight_recorder import (
    FlightRecorder,
    first_disagreement,
    read_hang_reports,
    summarize,
    write_hang_report,
)

G, H = "default_pg[0, 1]", "mesh_cp[0, 1]"  # groups named by string (a real group is named `desc[ranks]`)


def _rank(skip_third: bool) -> FlightRecorder:
    """Two steps of [all-to-all with this rank's rows, statistics all-reduce on H, gate-bias all-reduce]; the
    skipping rank leaves out step 1's gate-bias all-reduce."""
    rec = FlightRecorder(capacity=8)
    rows = 5 if skip_third else 3  # all-to-all inputs differ per rank: not a disagreement
    for step in (1, 2):
        rec.step, rec.phase = step, "forward"
        rec.record("all_to_all_single (autograd)", G, torch.zeros(rows, 4))
        with rec.collective("all_reduce (statistics)", H, torch.zeros(2)):
            pass
        if not (skip_third and step == 1):
            rec.step, rec.phase = step, "gate-bias"
            rec.record("all_reduce (sum over ranks)", G, torch.zeros(3, 8, dtype=torch.int64))
    return rec


def test_entries_count_per_group_and_keep_the_last_ones():
    rec = _rank(skip_third=False)
    assert rec.seq == 6 and rec.group_seq == {G: 4, H: 2}
    assert [e["group_seq"] for e in rec.entries if e["group"] == G] == [1, 2, 3, 4]
    stats = [e for e in rec.entries if e["group"] == H]
    assert all(e["state"] == "completed" for e in stats)  # returned from the `with`
    last = rec.entries[-1]
    assert (last["op"], last["sizes"], last["dtype"], last["step"], last["phase"], last["state"]) == (
        "all_reduce (sum over ranks)",
        [[3, 8]],
        "int64",
        2,
        "gate-bias",
        "issued",
    )
    small = FlightRecorder(capacity=2)
    for _ in range(5):
        small.record("barrier", G)
    assert [e["seq"] for e in small.entries] == [4, 5]  # a ring: the last `capacity` entries


def test_reports_name_the_first_collective_where_the_ranks_differ(tmp_path):
    for rank, rec in enumerate((_rank(skip_third=False), _rank(skip_third=True))):
        path = write_hang_report(
            tmp_path,
            rank=rank,
            world_size=2,
            step=rec.step,
            phase=rec.phase,
            error=RuntimeError("timed out"),
            timeout_s=5.0,
            recorder=rec,
        )
        assert path.name == f"hang_rank{rank}.json"
    reports = read_hang_reports(tmp_path)
    assert sorted(reports) == [0, 1] and reports[1]["collectives_recorded"] == 5
    n, calls = first_disagreement(reports, G)
    # collective #2 of G: rank 0's step-1 gate-bias all-reduce, rank 1's step-2 all-to-all
    assert n == 2
    assert (calls[0]["op"], calls[0]["step"]) == ("all_reduce (sum over ranks)", 1)
    assert (calls[1]["op"], calls[1]["step"]) == ("all_to_all_single (autograd)", 2)
    assert first_disagreement(reports, H) is None  # the statistics group agrees (#1 and #2 on both)
    text = summarize(reports)
    assert "DIVERGED at collective #2 of this group" in text and text.count("DIVERGED") == 1

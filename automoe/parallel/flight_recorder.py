"""Collective flight recorder: the last collectives each rank issued, and the report it writes when one hangs.

Every collective automoe issues itself (expert all-to-alls, routing-statistics and gradient all-reduces, the
grad-norm reduction, the loss/metrics and gate-bias sums, checkpoint barriers, the CP K/V gathers) is recorded
just before it is issued: op, process group (its description and ranks), tensor sizes and dtype, its sequence
number on that group and in this process, and the trainer's step and phase. The last `CAPACITY` entries stay in a
ring buffer (a deque append, about a microsecond). Collectives torch issues inside FSDP2, DTensor and DCP are not
recorded here; set `TORCH_FR_BUFFER_SIZE=N` (torch's own flight recorder, before the process group starts) and
the report adds torch's last entries, which cover them (at tens to hundreds of microseconds per collective).

When a collective fails (a peer hung past `parallel.collective_timeout_s`, or died), the trainer has every rank
write `output_dir/hang_rank<r>.json` (`write_hang_report`): what it was doing and its recent collectives. The
n-th collective of a group must be the same call on every member, so comparing the files shows the rank that
diverged: `python -m automoe.parallel.flight_recorder OUTPUT_DIR` prints, per group, each rank's last
collective and the first sequence number where the ranks disagree.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

CAPACITY = 256  # entries kept per process
REPORT_GLOB = "hang_rank*.json"


def report_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / f"hang_rank{rank}.json"


class FlightRecorder:
    """Ring buffer of this process's recent collectives, plus the step and phase the trainer is in."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.seq = 0  # collectives recorded by this process
        self.group_seq: dict[str, int] = {}  # collectives recorded per group (comparable across its ranks)
        self.step = 0
        self.phase = "start-up"
        self._names: dict[int, str] = {}

    def group_name(self, group: dist.ProcessGroup | str | None) -> str:
        """`<description>[ranks]`, e.g. `default_pg[0, 1]`, `mesh_ep[0, 1]`, `mesh_cp[2, 3]` (a str: itself)."""
        if isinstance(group, str):
            return group
        key = id(group)
        if key not in self._names:
            pg = group if group is not None else dist.group.WORLD
            desc = getattr(pg, "group_desc", None) or getattr(pg, "group_name", None) or "group"
            try:
                ranks = dist.get_process_group_ranks(pg)
            except (RuntimeError, ValueError):
                ranks = []
            self._names[key] = f"{desc}{ranks}"
        return self._names[key]

    def record(
        self, op: str, group: dist.ProcessGroup | str | None, *tensors: Tensor, **extra: Any
    ) -> dict[str, Any]:
        """Append one collective (state `issued`); -> its entry (the caller may mark it `completed`)."""
        name = self.group_name(group)
        self.seq += 1
        self.group_seq[name] = group_seq = self.group_seq.get(name, 0) + 1
        entry = {
            "seq": self.seq,
            "group": name,
            "group_seq": group_seq,
            "op": op,
            "sizes": [list(t.shape) for t in tensors],
            "dtype": str(tensors[0].dtype).removeprefix("torch.") if tensors else None,
            "step": self.step,
            "phase": self.phase,
            "state": "issued",
            "time": time.time(),
            **extra,
        }
        self.entries.append(entry)
        return entry

    @contextlib.contextmanager
    def collective(
        self, op: str, group: dist.ProcessGroup | str | None, *tensors: Tensor, **extra: Any
    ) -> Iterator[None]:
        """Record a blocking collective around its call: `completed` once it returns."""
        entry = self.record(op, group, *tensors, **extra)
        yield
        entry["state"] = "completed"

    def clear(self) -> None:
        self.entries.clear()
        self.seq, self.group_seq = 0, {}


RECORDER = FlightRecorder()  # one per process (a rank); the trainer sets its step and phase
record = RECORDER.record
collective = RECORDER.collective


def torch_flight_recorder(last: int = CAPACITY) -> list[dict[str, Any]] | None:
    """torch's own flight-recorder entries (every collective, FSDP and DCP included), when it runs
    (`TORCH_FR_BUFFER_SIZE` / `TORCH_NCCL_TRACE_BUFFER_SIZE` > 0 and a torch that has it); else None."""
    sizes = (os.environ.get("TORCH_FR_BUFFER_SIZE"), os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE"))
    if not any(s and s.strip() not in ("", "0") for s in sizes):
        return None
    dump = getattr(torch._C._distributed_c10d, "_dump_fr_trace_json", None)
    if dump is None:
        return None
    try:
        entries = json.loads(dump(includeCollectives=True, onlyActive=False)).get("entries", [])
    except Exception:  # noqa: BLE001 -- a report must not fail on a private torch API
        return None
    keys = (
        "collective_seq_id",
        "process_group",
        "profiling_name",
        "input_sizes",
        "input_dtypes",
        "state",
        "retired",
        "time_created_ns",
        "timeout_ms",
    )
    return [{k: e.get(k) for k in keys} for e in entries[-last:]]


def write_hang_report(
    output_dir: str | Path,
    *,
    rank: int,
    world_size: int,
    step: int,
    phase: str,
    error: BaseException | str,
    timeout_s: float | None = None,
    recorder: FlightRecorder = RECORDER,
) -> Path:
    """Write `output_dir/hang_rank<rank>.json`: this rank's step, phase, error and recent collectives."""
    last_per_group: dict[str, dict[str, Any]] = {}
    for entry in recorder.entries:
        last_per_group[entry["group"]] = entry
    report = {
        "rank": rank,
        "world_size": world_size,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "step": step,
        "phase": phase,
        "error": str(error),
        "collective_timeout_s": timeout_s,
        "collectives_recorded": recorder.seq,
        "last_per_group": last_per_group,
        "collectives": list(recorder.entries),
        "torch_flight_recorder": torch_flight_recorder(),
    }
    path = report_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_hang_reports(output_dir: str | Path) -> dict[int, dict[str, Any]]:
    """rank -> its hang report, for every `hang_rank<r>.json` in `output_dir`."""
    reports = [json.loads(p.read_text()) for p in sorted(Path(output_dir).glob(REPORT_GLOB))]
    return {r["rank"]: r for r in reports}


def _describe(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "nothing recorded"
    return (
        f"#{entry['group_seq']} {entry['op']} {entry['dtype']} {entry['sizes']} ({entry['state']}) at step "
        f"{entry['step']}, {entry['phase']}"
    )


def _signature(entry: dict[str, Any]) -> tuple:
    """What must be equal on every rank for the same collective: op and dtype, and the sizes except for an
    all-to-all (each rank sends its own number of rows)."""
    sizes = None if "all_to_all" in entry["op"] else json.dumps(entry["sizes"])
    return entry["op"], entry["dtype"], sizes


def first_disagreement(reports: dict[int, dict[str, Any]], group: str) -> tuple[int, dict[int, Any]] | None:
    """(n, rank -> its n-th collective on `group`) for the first n where the ranks that recorded it issued
    different calls (`_signature`); None when they agree on everything they all still hold."""
    by_rank = {
        rank: {e["group_seq"]: e for e in r["collectives"] if e["group"] == group}
        for rank, r in reports.items()
    }
    by_rank = {rank: entries for rank, entries in by_rank.items() if entries}
    if len(by_rank) < 2:
        return None
    common = set.intersection(*(set(entries) for entries in by_rank.values()))
    for n in sorted(common):
        calls = {rank: entries[n] for rank, entries in by_rank.items()}
        if len({_signature(c) for c in calls.values()}) > 1:
            return n, calls
    return None


def summarize(reports: dict[int, dict[str, Any]]) -> str:
    """Human-readable comparison of the ranks' hang reports: where each rank is, and where they diverged."""
    if not reports:
        return "no hang reports"
    lines = []
    for rank in sorted(reports):
        r = reports[rank]
        lines.append(f"rank {rank}: step {r['step']}, {r['phase']}: {r['error'][:200]}")
    groups = sorted({g for r in reports.values() for g in r["last_per_group"]})
    for group in groups:
        lines.append(f"group {group}:")
        for rank in sorted(reports):
            lines.append(f"  rank {rank} last: {_describe(reports[rank]['last_per_group'].get(group))}")
        split = first_disagreement(reports, group)
        if split is not None:
            n, calls = split
            lines.append(f"  DIVERGED at collective #{n} of this group:")
            for rank, call in sorted(calls.items()):
                lines.append(f"    rank {rank}: {_describe(call)}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m automoe.parallel.flight_recorder OUTPUT_DIR")
    print(summarize(read_hang_reports(sys.argv[1])))

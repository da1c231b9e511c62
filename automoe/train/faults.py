"""Fault injection for the reliability tests: kill, hang or poison a rank at a chosen step or checkpoint point.

Driven by `AUTOMOE_FAULT` (read once, at first use); unset, every hook is one `is None` test. Spec: one or more
`;`-separated `kind:arg[:rank[:attempt]]`. rank: `*` or absent = every rank. attempt: the `torchrun --max-restarts`
attempt (`TORCHELASTIC_RESTART_COUNT`) it fires in, default 0, so the restart a fault provokes runs clean.

    kill_at_step:N        SIGKILL this process when step N begins (what `kill -9` does)
    hang_at_step:N        sleep forever when step N begins (a stuck peer: the others must time out)
    nan_at_step:N         make this rank's loss NaN in step N (so its gradients are NaN too)
    crash_in_save:P[@N]   SIGKILL at checkpoint point P (`SAVE_POINTS`), in the save of step N (default: first)
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ENV_VAR = "AUTOMOE_FAULT"
KINDS = ("kill_at_step", "hang_at_step", "nan_at_step", "crash_in_save")
# Every point `Checkpointer` passes through while saving, in order (async: `dcp.*` run in a background thread).
SAVE_POINTS = (
    "save.begin",  # nothing written yet for this step
    "save.dir_created",  # empty step dir (rank 0 made it)
    "save.rng_partial",  # half of this rank's rng/rank_<r>.json.tmp written
    "save.rng_written",
    "save.state_partial",  # half of trainer_state.json.tmp written (rank 0)
    "save.state_written",
    "save.config_written",
    "dcp.before_data",  # before this rank's .distcp shard file
    "dcp.data_partial",  # this rank's shard file cut to half its length
    "dcp.after_data",  # shard on disk, no .metadata yet
    "dcp.before_metadata",  # rank 0, every shard written
    "dcp.after_metadata",
    "save.async_started",  # async: the background write was launched, nothing awaited
    "save.before_marker",  # every rank's files are on disk
    "save.marker_partial",  # half of COMPLETE.tmp written (rank 0)
    "save.marker_written",  # complete, nothing pruned yet
    "prune.marker_removed",  # an old checkpoint lost its marker, its files are still there
    "prune.files_half_removed",  # an old checkpoint is half deleted
    "prune.done",
)


class FaultSpecError(ValueError):
    """`AUTOMOE_FAULT` does not parse."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None  # the step it fires at (crash_in_save: the save's step; None = the first save)
    point: str | None  # crash_in_save only
    rank: int | None  # None = every rank
    attempt: int = 0


def parse(spec: str) -> list[Fault]:
    """`AUTOMOE_FAULT` text -> faults; raises FaultSpecError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        fields = part.split(":")
        if len(fields) not in (2, 3, 4) or fields[0] not in KINDS:
            raise FaultSpecError(
                f"{ENV_VAR}: {part!r} is not kind:arg[:rank[:attempt]] with kind in {list(KINDS)}"
            )
        kind, arg = fields[0], fields[1]
        try:
            rank = int(fields[2]) if len(fields) > 2 and fields[2] not in ("", "*") else None
            attempt = int(fields[3]) if len(fields) > 3 else 0
            if kind == "crash_in_save":
                point, _, step = arg.partition("@")
                if point not in SAVE_POINTS:
                    raise FaultSpecError(f"{ENV_VAR}: save point {point!r} is not one of {list(SAVE_POINTS)}")
                faults.append(Fault(kind, int(step) if step else None, point, rank, attempt))
            else:
                faults.append(Fault(kind, int(arg), None, rank, attempt))
        except ValueError as e:
            if isinstance(e, FaultSpecError):
                raise
            raise FaultSpecError(f"{ENV_VAR}: {part!r} has a non-integer step or rank") from None
    return faults


_UNREAD = object()
_faults: list[Fault] | None | object = _UNREAD
_rank = 0
_attempt = 0


def configure(spec: str | None, *, rank: int = 0, attempt: int = 0) -> None:
    """Set the faults (None = none) instead of reading `AUTOMOE_FAULT`; tests call it in forked workers."""
    global _faults, _rank, _attempt
    _faults = parse(spec) if spec else None
    _rank, _attempt = rank, attempt


def _active() -> list[Fault] | None:
    if _faults is _UNREAD:
        spec = os.environ.get(ENV_VAR)
        configure(
            spec,
            rank=int(os.environ.get("RANK", "0")),
            attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )
    return _faults  # type: ignore[return-value]


def _matching(kind: str, step: int | None, point: str | None = None) -> Fault | None:
    for fault in _active() or ():
        if fault.kind != kind or fault.attempt != _attempt or fault.rank not in (None, _rank):
            continue
        if fault.point == point and (fault.step is None or fault.step == step):
            return fault
    return None


def die() -> None:
    """SIGKILL ourselves: no exception handlers, no atexit, no flushing (the honest model of a dead node)."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # the signal is delivered asynchronously


def at_step(step: int) -> None:
    """Called when `step` begins: kill or hang this rank if asked to."""
    if _faults is None:
        return
    if _matching("kill_at_step", step):
        die()
    if _matching("hang_at_step", step):
        while True:
            time.sleep(3600)


def poison_loss(step: int) -> bool:
    """True when this rank's loss must be made NaN in `step`."""
    return _faults is not None and _matching("nan_at_step", step) is not None


def save_point(point: str, step: int) -> None:
    """Called at each `SAVE_POINTS` entry of the save of `step`: die there if asked to."""
    if _faults is not None and _matching("crash_in_save", step, point):
        die()


def wants_save_point(point: str, step: int) -> bool:
    """For points that must prepare the damage first (a half-written file): will `save_point` die here?"""
    return _faults is not None and _matching("crash_in_save", step, point) is not None

"""Fault injection for the reliability tests: kill, hang or poison a rank at a chosen step or checkpoint point.

One hook object per job (`from_env`: `AUTOMOE_FAULT`, read once by `build_trainer`) is handed to the trainer and
the checkpointer; unset, it is `NullFaults`, whose hooks do nothing. Spec: one or more
`;`-separated `kind:arg[:rank[:attempt]]`. rank: `*` or absent = every rank. attempt: the `torchrun --max-restarts`
attempt (`TORCHELASTIC_RESTART_COUNT`) it fires in, default 0, so the restart a fault provokes runs clean.

    kill_at_step:N        SIGKILL this process when step N begins (what `kill -9` does)
    hang_at_step:N        sleep forever when step N begins (a stuck peer: the others must time out)
    nan_at_step:N         make this rank's loss NaN in step N (so its gradients are NaN too)
    skip_collective:N     leave out the gate-bias load all-reduce of step N (its last collective), wait until the
                          peers have timed out on it, then run on into step N+1 (see `skips_collective`)
    crash_in_save:P[@N]   SIGKILL at checkpoint point P (`SAVE_POINTS`), in the save of step N (default: first)
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

ENV_VAR = "AUTOMOE_FAULT"
KINDS = ("kill_at_step", "hang_at_step", "nan_at_step", "skip_collective", "crash_in_save")
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


def die() -> None:
    """SIGKILL ourselves: no exception handlers, no atexit, no flushing (the honest model of a dead node)."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # the signal is delivered asynchronously


class FaultHooks(Protocol):
    """What the training loop and the checkpointer call; `NullFaults` (the default) does nothing."""

    def at_step(self, step: int) -> None:
        """`step` begins: kill or hang this rank if asked to."""

    def poison_loss(self, ce_sum: Tensor, step: int) -> Tensor:
        """`ce_sum`, or NaN if this rank's loss must be poisoned in `step` (its gradients follow)."""

    def skips_collective(self, step: int, *, wait_s: float = 0.0) -> bool:
        """Must this rank leave out the gate-bias load all-reduce of `step`? If so, first wait `wait_s` (longer
        than the collective timeout): the peers then time out on the missing collective, as they would on a
        real skip; without the wait gloo would pair it with this rank's next, different collective and abort a
        process on the size mismatch before either could report (`automoe.parallel.flight_recorder`)."""

    def crashes_at(self, point: str, step: int) -> bool:
        """Will `at(point, step)` kill this rank?"""

    def at(self, point: str, step: int, *, damage: Callable[[], object] | None = None) -> None:
        """Checkpoint point `point` (`SAVE_POINTS`) of the save of `step`: die here if asked to, after running
        `damage` (which leaves what a crash mid-write would: half a file)."""


class NullFaults:
    """No faults: every hook returns at once."""

    def at_step(self, step: int) -> None:
        pass

    def poison_loss(self, ce_sum: Tensor, step: int) -> Tensor:
        return ce_sum

    def skips_collective(self, step: int, *, wait_s: float = 0.0) -> bool:
        return False

    def crashes_at(self, point: str, step: int) -> bool:
        return False

    def at(self, point: str, step: int, *, damage: Callable[[], object] | None = None) -> None:
        pass


NO_FAULTS = NullFaults()


class InjectedFaults:
    """The faults of a spec, as seen by `rank` in torchrun restart `attempt`."""

    def __init__(self, faults: list[Fault], *, rank: int = 0, attempt: int = 0) -> None:
        self.faults, self.rank, self.attempt = faults, rank, attempt

    def _matching(self, kind: str, step: int | None, point: str | None = None) -> Fault | None:
        for fault in self.faults:
            if fault.kind != kind or fault.attempt != self.attempt or fault.rank not in (None, self.rank):
                continue
            if fault.point == point and (fault.step is None or fault.step == step):
                return fault
        return None

    def at_step(self, step: int) -> None:
        if self._matching("kill_at_step", step):
            die()
        if self._matching("hang_at_step", step):
            while True:
                time.sleep(3600)

    def poison_loss(self, ce_sum: Tensor, step: int) -> Tensor:
        return ce_sum * float("nan") if self._matching("nan_at_step", step) else ce_sum

    def skips_collective(self, step: int, *, wait_s: float = 0.0) -> bool:
        if self._matching("skip_collective", step) is None:
            return False
        time.sleep(wait_s)
        return True

    def crashes_at(self, point: str, step: int) -> bool:
        return self._matching("crash_in_save", step, point) is not None

    def at(self, point: str, step: int, *, damage: Callable[[], object] | None = None) -> None:
        if self.crashes_at(point, step):
            if damage is not None:
                damage()
            die()


def from_spec(spec: str | None, *, rank: int = 0, attempt: int = 0) -> FaultHooks:
    """Hooks for an `AUTOMOE_FAULT` spec (None or empty: `NullFaults`); raises FaultSpecError if it does not parse."""
    return InjectedFaults(parse(spec), rank=rank, attempt=attempt) if spec else NO_FAULTS


def from_env(*, rank: int) -> FaultHooks:
    """Hooks for `AUTOMOE_FAULT` in this process's environment, in torchrun attempt `TORCHELASTIC_RESTART_COUNT`."""
    return from_spec(
        os.environ.get(ENV_VAR), rank=rank, attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    )

"""The job lifecycle every recipe shares: distributed start-up, logging, the resolved config, fit, teardown."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from automoe.config.job import JobConfig
from automoe.host_memory import apply_host_allocator
from automoe.parallel import DistEnv, init_distributed, shutdown_distributed
from automoe.train.build import StartPlan, build_trainer, config_to_yaml, plan_start
from automoe.train.trainer import Trainer

logger = logging.getLogger("automoe")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; the other ranks only warnings and errors (tagged with their rank)."""
    for name, log in logging.root.manager.loggerDict.items():  # hydra's "disabled" logging switched ours off
        if name.startswith("automoe") and isinstance(log, logging.Logger):
            log.disabled = False
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class StartupError(ValueError):
    """A start refused before training; rank 0 has already printed why (once, for every rank)."""


def run_job(cfg: JobConfig, *, after_fit: Callable[[Trainer, DistEnv], None] | None = None) -> dict[str, Any]:
    """Init distributed -> host allocator (`train.host_allocator`) -> log the resolved config -> agree on the
    start (`check_start`) -> build -> save the resolved config -> `Trainer.fit` -> `after_fit` -> teardown.

    Returns the last step's metrics record ({} when the run was already complete: nothing is built then). A start
    refused by a check raises `StartupError` on every rank after rank 0 printed the reason once, and leaves
    `output_dir` untouched. On success every rank meets at a barrier before the process groups are destroyed;
    after a failure they are destroyed at once (a dead peer would hold a barrier until timeout). A successful
    multi-process job whose gloo threads outlive the teardown ends its process here, with exit status 0, instead
    of returning (see `_exit_before_finalization`).
    """
    release_held_stderr()
    env = init_distributed(timeout_s=cfg.parallel.collective_timeout_s)
    setup_logging(env.rank)
    allocator = apply_host_allocator(cfg.train.host_allocator)  # before the model's first large tensor
    if env.is_main:
        logger.info("%s", allocator)
    clean = False
    trainer = None
    last: dict[str, Any] = {}
    try:
        resolved = config_to_yaml(cfg)
        if env.is_main:
            logger.info("world size %d, resolved config:\n%s", env.world_size, resolved)
        plan = check_start(cfg, env)
        if plan.done is not None:
            if env.is_main:
                logger.info("%s", plan.done)
        else:
            trainer = build_trainer(cfg, env, plan=plan)
            if env.is_main:  # only now: a refused start leaves the previous run's config.yaml alone
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
                (Path(cfg.output_dir) / "config.yaml").write_text(resolved)
            last = trainer.fit()
            if last:
                val = f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""
                logger.info(
                    "finished step %d: loss %.4f%s; outputs in %s",
                    last["step"],
                    last["loss"],
                    val,
                    cfg.output_dir,
                )
            if after_fit is not None:
                after_fit(trainer, env)
        clean = True
    finally:
        trainer = None  # model, meshes and checkpointer hold the process groups
        threads_left = shutdown_distributed(clean=clean)
    if clean and threads_left:
        _exit_before_finalization(threads_left)
    return last


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {','.join(map(str, ranks))}"


def check_start(cfg: JobConfig, env: DistEnv) -> StartPlan:
    """Every rank's `plan_start` verdict and resolved config, compared before anything is built.

    One `all_gather_object` over the default group: each rank sends its resolved config, its absolute
    `output_dir` and its start-up error (or None). The job goes on only if every rank has the same config (a
    `${now:...}` output_dir, an environment-dependent interpolation or another code version would otherwise
    fail at the first save or hang a collective) and no rank refused. Otherwise rank 0 prints each distinct
    reason once, naming the ranks and the keys that differ, and every rank raises `StartupError`.
    """
    error, plan = None, None
    try:
        plan = plan_start(cfg, env)
    except ValueError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - any failure must reach the gather, or the other ranks would hang
        logger.error("rank %d: unexpected error while checking the start", env.rank, exc_info=True)
        error = f"{type(e).__name__}: {e}"
    mine = {
        "config": _flat(OmegaConf.to_container(OmegaConf.structured(cfg))),
        "output_dir": str(Path(cfg.output_dir).absolute()),
        "error": error,
    }
    everyone = [mine]
    if env.world_size > 1 and dist.is_initialized():
        everyone = [None] * env.world_size
        dist.all_gather_object(everyone, mine)
    problems = []
    reference = everyone[0]["config"]
    keys = sorted({k for r in everyone for k in r["config"]})
    differing = [k for k in keys if any(r["config"].get(k) != reference.get(k) for r in everyone)]
    for key in differing:
        by_value: dict[str, list[int]] = {}
        for rank, r in enumerate(everyone):
            by_value.setdefault(repr(r["config"].get(key)), []).append(rank)
        values = "; ".join(f"{_ranks(ranks)}: {value}" for value, ranks in by_value.items())
        problems.append(f"{key} differs between ranks ({values})")
    dirs = {r["output_dir"] for r in everyone}
    if len(dirs) > 1 and "output_dir" not in differing:
        by_dir: dict[str, list[int]] = {}
        for rank, r in enumerate(everyone):
            by_dir.setdefault(r["output_dir"], []).append(rank)
        problems.append(
            "output_dir resolves to different directories ("
            + "; ".join(f"{_ranks(ranks)}: {d}" for d, ranks in by_dir.items())
            + "): run every rank from the same working directory or give an absolute path"
        )
    if problems:
        problems.insert(
            0,
            "the config must be the same on every rank (checkpoints, collectives and the data order depend on "
            "it); give these keys fixed values on the command line",
        )
    else:
        by_error: dict[str, list[int]] = {}
        for rank, r in enumerate(everyone):
            if r["error"] is not None:
                by_error.setdefault(r["error"], []).append(rank)
        for message, ranks in by_error.items():
            where = "" if len(ranks) == len(everyone) else f" ({_ranks(ranks)})"
            problems.append(f"{message}{where}")
    if problems:
        text = "\n".join(problems)
        if env.is_main:
            logger.error("refusing to start: %s", text)
        if env.world_size > 1 and dist.is_initialized():
            dist.barrier()  # rank 0 has printed before any rank exits (torchrun then ends the others)
        raise StartupError(text)
    if env.is_main:
        for warning in plan.warnings:
            logger.warning("%s", warning)
    return plan


# ---- the recipes' entry point: each error printed once, by rank 0 ----
_HELD: list[tuple[Any, io.StringIO]] = []
PEER_REPORT_DELAY_S = 10.0


def recipe_main(
    make_cfg: Callable[[], JobConfig],
    *,
    after_fit: Callable[[JobConfig], Callable[[Trainer, DistEnv], None] | None] | None = None,
) -> None:
    """A recipe's Hydra task function: compose the typed config, then `run_job`.

    A config that does not convert (unknown key, bad value) prints `error: ...` and exits with status 1 before
    any process group exists; a start refused by `check_start` exits with status 1 after rank 0 printed why.
    Neither prints a traceback. `after_fit(cfg)`: the callback handed to `run_job` (or None).
    """
    try:
        cfg = make_cfg()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    try:
        run_job(cfg, after_fit=after_fit(cfg) if after_fit is not None else None)
    except StartupError:
        raise SystemExit(1) from None


@contextlib.contextmanager
def hold_peer_stderr():
    """Around a recipe's `main()`: ranks other than 0 hold their stderr back until `run_job` starts.

    Until then every rank composes the same config from the same command line, so a composition error or a
    config warning on rank k repeats rank 0's word for word. If rank k fails before `run_job`, it waits
    `PEER_REPORT_DELAY_S` and then prints what it held: when rank 0 failed the same way, torchrun has ended this
    process by then; when only this rank failed, its message still comes out.
    """
    rank = int(os.environ.get("RANK", "0"))
    real = sys.stderr
    if rank == 0:
        yield
        return
    held = io.StringIO()
    sys.stderr = held
    _HELD.append((real, held))
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:  # a clean exit (--help, --cfg job) has nothing to say
            raise
        if _HELD and _HELD[-1][1] is held:
            _HELD.pop()
            sys.stderr = real
            time.sleep(PEER_REPORT_DELAY_S)
            real.write(held.getvalue())
            real.flush()
        raise
    finally:
        if _HELD and _HELD[-1][1] is held:
            _HELD.pop()
        if sys.stderr is held:
            sys.stderr = real


def release_held_stderr() -> None:
    """The job has started: this rank's stderr goes out again (what was held repeated rank 0's output)."""
    while _HELD:
        real, _ = _HELD.pop()
        sys.stderr = real


def _exit_before_finalization(threads_left: int) -> None:
    """End a finished job's process now: flush, then `os._exit(0)`, skipping interpreter finalization.

    Cause of the rare `terminate called without an active exception` (SIGABRT, exit -6) after the last step.
    Measured: the process groups outlive `destroy_process_group` (DeviceMesh, FSDP and DTensor state keep Python
    references to them; dropping the trainer and `gc.collect()` do not free them), so at exit each rank of the
    EP=2 recipe still runs 6 gloo groups = 18 native threads (12 `pt_gloo_runloop` workers, 6 `gloo_tcp_loop`
    socket loops). Their C++ destructors, the only place those threads are joined, then run during interpreter
    finalization and static destruction, in no fixed order, while the peer rank exits and closes its sockets.
    Inferred (the abort was not caught in a core dump): a gloo thread that takes the GIL then (to drop a tensor's
    Python object) is ended by CPython with `pthread_exit`, whose forced unwind through a noexcept C++ frame
    calls `std::terminate`. Every output is written and closed by now (checkpoints waited, metrics and wandb
    closed, process groups destroyed), so skipping finalization loses nothing and leaves no thread to race it.
    """
    logger.debug(
        "%d gloo threads outlive the process groups; exiting before interpreter finalization", threads_left
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

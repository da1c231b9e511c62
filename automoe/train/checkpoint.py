"""Distributed checkpoints: one `step_<N>/` directory per save, complete only once its marker file exists.

Inside `step_<N>/`: DCP files (`.metadata`, `__<rank>_0.distcp`) with the model (gate correction biases are
persistent buffers, so they ride along) and optimizer state in any sharded layout; `trainer_state.json` (step,
scheduler, loader position); `rng/rank_<r>.json` (each rank's RNG states); `config.yaml` (the resolved job
config); and `COMPLETE`, written last by rank 0 after every rank finished. Non-tensor state is JSON, so loading
never unpickles anything.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from automoe.moe.layer import BIAS_UPDATE_STATE
from automoe.parallel import flight_recorder
from automoe.parallel.pipeline import is_pipeline_stage
from automoe.shapes import config_diff, tensor_shape_mismatches
from automoe.train.checkpoint_storage import (
    FaultPointWriter,
    SafeFileSystemReader,
    check_shard_files,
    fsync_dir,
    read_json,
    rng_state,
    set_rng_state,
    single_process_ok,
    write_json,
)
from automoe.train.faults import NO_FAULTS, FaultHooks

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
_SHOW = 6  # mismatched tensors named in a shape error (then '+N more')
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---- finding checkpoints ----
def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Every `step_<N>` directory under `root` (complete or not), sorted by N."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete `step_<N>` directory under `root`; directories without the marker are ignored."""
    complete = [p for _, p in step_dirs(root) if is_complete(p)]
    return complete[-1] if complete else None


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """`checkpoint.resume` -> the directory to load, or None for a fresh start.

    null: fresh. `latest`: the newest complete checkpoint under `root`, fresh if there is none (so one command
    line serves the first start and every restart). Otherwise a path that must be a complete `step_<N>`
    checkpoint. A run never writes next to complete checkpoints of another history: a fresh start where `root`
    already holds some, or a resume from an older one while newer ones exist there, is refused (instead of
    mixing the two or pruning the newer ones away).
    """
    if resume == "latest":
        return latest_checkpoint(root)
    newest = latest_checkpoint(root)
    if resume is None:
        if newest is not None:
            raise ValueError(
                f"checkpoint.resume=None (fresh start) but {root} already holds complete checkpoints (newest "
                f"{newest.name}); use checkpoint.resume=latest to continue them or choose another output_dir"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={resume!r} is not a directory")
    if not _STEP_DIR.match(path.name):
        inside = [p.name for _, p in step_dirs(path) if is_complete(p)]
        hint = (
            f"it holds {', '.join(inside)}: pick one" if inside else "it holds no complete step_<N> directory"
        )
        raise ValueError(f"checkpoint.resume={resume!r} is not a step_<N> checkpoint directory ({hint})")
    if not is_complete(path):
        raise ValueError(
            f"checkpoint.resume={resume!r} has no {MARKER} marker: the save did not finish (or it is not a "
            "step_<N> checkpoint directory); pick another or use checkpoint.resume=latest"
        )
    step = int(_STEP_DIR.match(path.name).group(1))
    if newest is not None and int(_STEP_DIR.match(newest.name).group(1)) > step:
        raise ValueError(
            f"checkpoint.resume={resume!r} is older than {newest} in this run's checkpoint directory: continuing "
            "from it would mix two histories there; resume from the newest, or copy the checkpoint into "
            "another output_dir"
        )
    return path


def check_step_dir(path: str | Path, *, key: str) -> Path:
    """`path` as a complete `step_<N>` checkpoint directory, or a ValueError naming `key` and what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{key}={str(path)!r} is not a directory")
    if not _STEP_DIR.match(path.name):
        inside = [p.name for _, p in step_dirs(path) if is_complete(p)]
        if not inside:
            inside = [p.name for _, p in step_dirs(path / "checkpoints") if is_complete(p)]
        hint = (
            f"it holds {', '.join(inside)}: pick one" if inside else "it holds no complete step_<N> directory"
        )
        raise ValueError(f"{key}={str(path)!r} is not a step_<N> checkpoint directory ({hint})")
    if not is_complete(path):
        raise ValueError(f"{key}={str(path)!r} has no {MARKER} marker: the save did not finish; pick another")
    return path


def saved_step(path: str | Path) -> int:
    """The step a complete checkpoint was written after (from its `trainer_state.json`)."""
    return int(read_json(Path(path) / STATE_FILE)["step"])


def saved_config(path: str | Path) -> dict:
    """The resolved job config a checkpoint was written with, as a dict (ValueError naming the file)."""
    saved_file = Path(path) / CONFIG_FILE
    try:
        return OmegaConf.to_container(OmegaConf.create(saved_file.read_text()))
    except Exception as e:  # noqa: BLE001 - any parse failure is reported with the file name
        raise ValueError(f"checkpoint file {saved_file} is missing or corrupt: {e}") from None


def config_changes(path: str | Path, config_yaml: str, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key=this run's value (checkpoint: saved value)` for every setting that differs from the checkpoint's
    config, keys in `ignore` (and their sub-keys) left out."""
    mine = OmegaConf.to_container(OmegaConf.create(config_yaml))
    return [
        f"{key}={new!r} (checkpoint: {old!r})"
        for key, old, new in config_diff(saved_config(path), mine)
        if not any(key == k or key.startswith(k + ".") for k in ignore)
    ]


def _barrier() -> None:
    if dist.is_initialized():
        with flight_recorder.collective("barrier (checkpoint)", None):
            dist.barrier()


def _remove_every_other_file(path: Path) -> None:
    for f in sorted(x for x in path.rglob("*") if x.is_file())[::2]:
        f.unlink()


# AdamW implementation choices of this run's layout (`automoe.train.optim`), not state: a checkpoint's param
# groups must not switch them (fused=True from an all-DTensor FSDP run fails on a layout mixing DTensors and plain
# tensors, e.g. tensor or expert parallelism without FSDP)
_OPTIMIZER_IMPLEMENTATION = ("fused", "foreach")


def set_model_and_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict
) -> None:
    """`set_state_dict` of a loaded checkpoint, keeping the optimizer's own implementation flags."""
    kept = [{k: g[k] for k in _OPTIMIZER_IMPLEMENTATION if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for group, flags in zip(optimizer.param_groups, kept):
        group.update(flags)


class Checkpointer:
    """Saves and loads `step_<N>/` checkpoints under `root`. Every rank calls every method (they are collective).

    `config_yaml` is the resolved job config: saved in each checkpoint and compared (its `model` section) with
    the checkpoint's on load. `async_save` writes tensors in the background on a dedicated gloo group; the
    marker is written when the next `save` or `wait` finds the write finished on every rank. `faults` is passed
    every point of `SAVE_POINTS` (the reliability tests crash there; the default does nothing).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        config_yaml: str,
        keep_last_n: int = 0,
        async_save: bool = False,
        faults: FaultHooks = NO_FAULTS,
    ) -> None:
        self.root = Path(root)
        self.faults = faults
        self.config_yaml = config_yaml
        self.keep_last_n = keep_last_n
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.async_save = async_save
        # A separate gloo group keeps the background write's collectives off the training process group.
        self._async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._pending: tuple[Any, int, Path] | None = None

    # ---- save ----
    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader: Any,
    ) -> Path:
        """Write `step_<step>/`; returns its path. Sync: complete on return. Async: complete after `wait()`."""
        self.wait()
        path = self.root / f"step_{step}"
        if is_complete(path):
            logger.info("checkpoint %s already exists; not rewritten", path)
            return path
        self.faults.at("save.begin", step)
        if self.rank == 0:
            if path.exists():  # an unfinished earlier attempt at this step
                shutil.rmtree(path)
            (path / "rng").mkdir(parents=True)
        _barrier()
        self.faults.at("save.dir_created", step)
        start = time.perf_counter()
        rng_file = path / "rng" / f"rank_{self.rank}.json"
        write_json(rng_file, rng_state(), faults=self.faults, fault_point="save.rng_partial", step=step)
        self.faults.at("save.rng_written", step)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.rank == 0:
            trainer_state = {
                "format": FORMAT_VERSION,
                "step": step,
                "world_size": self.world_size,
                "scheduler": scheduler.state_dict(),
                "loader": loader.state_dict(),
            }
            write_json(
                path / STATE_FILE,
                trainer_state,
                faults=self.faults,
                fault_point="save.state_partial",
                step=step,
            )
            self.faults.at("save.state_written", step)
            (path / CONFIG_FILE).write_text(self.config_yaml)
            self.faults.at("save.config_written", step)
        writer = FaultPointWriter(str(path), step=step, faults=self.faults)
        if self.async_save:
            kwargs = {"process_group": self._async_group} if self._async_group is not None else {}
            with single_process_ok():
                future = dcp.async_save(state, storage_writer=writer, **kwargs)
            self._pending = (future, step, path)
            self.faults.at("save.async_started", step)
            logger.info("checkpoint step %d: async save started (%.2fs)", step, time.perf_counter() - start)
            return path
        with single_process_ok():
            dcp.save(state, storage_writer=writer)
        self._finish(step, path)
        logger.info("checkpoint step %d saved to %s (%.2fs)", step, path, time.perf_counter() - start)
        return path

    def wait(self) -> None:
        """Finish a pending async save: wait for it on every rank, then mark it complete and prune."""
        if self._pending is None:
            return
        future, step, path = self._pending
        self._pending = None
        future.result()
        self._finish(step, path)
        logger.info("checkpoint step %d saved to %s (async)", step, path)

    def _finish(self, step: int, path: Path) -> None:
        _barrier()  # every rank's shards and JSON files are on disk before the marker says so
        if self.rank == 0:
            self.faults.at("save.before_marker", step)
            marker = {"step": step, "world_size": self.world_size, "time": time.time()}
            write_json(
                path / MARKER, marker, faults=self.faults, fault_point="save.marker_partial", step=step
            )
            fsync_dir(path)
            self.faults.at("save.marker_written", step)
            self._prune(step)
            self.faults.at("prune.done", step)
        _barrier()

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last_n` complete checkpoints; drop unfinished directories older than them.

        Runs only after the checkpoint of `step` is complete, and never deletes the newest complete one.
        """
        dirs = step_dirs(self.root)
        complete = [(s, p) for s, p in dirs if is_complete(p)]
        if not complete:
            return
        doomed = (
            [(s, p) for s, p in complete[: -self.keep_last_n] if s != step] if self.keep_last_n > 0 else []
        )
        newest = complete[-1][0]
        doomed += [(s, p) for s, p in dirs if not is_complete(p) and s < newest]
        for _, p in doomed:
            # Remove the marker first: a crash mid-delete must not leave a "complete" partial directory.
            (p / MARKER).unlink(missing_ok=True)
            self.faults.at("prune.marker_removed", step)
            self.faults.at(
                "prune.files_half_removed", step, damage=functools.partial(_remove_every_other_file, p)
            )
            shutil.rmtree(p, ignore_errors=True)

    # ---- load ----
    def load(
        self,
        path: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader: Any,
    ) -> int:
        """Restore everything saved in `path` into objects already built in this run's layout; -> the step."""
        path = Path(path)
        if not is_complete(path):
            raise ValueError(f"checkpoint {path} has no {MARKER} marker: it is incomplete")
        saved_model_cfg = self._saved_model_config(path)
        trainer_state = read_json(path / STATE_FILE)
        if trainer_state.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint file {path / STATE_FILE} has format {trainer_state.get('format')!r}, "
                f"this automoe reads format {FORMAT_VERSION}: resume it with the automoe version that wrote it "
                "(docs/checkpoints.md lists which version writes which format), or export its weights there "
                "(python -m automoe.convert) and start a new run from them"
            )
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        reader, metadata = self._checked_reader(
            path, model_sd, saved_model_cfg, partial=is_pipeline_stage(model)
        )
        try:
            with single_process_ok():
                dcp.load(without_fresh_bias_state(path, state, metadata), storage_reader=reader)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps ranks' failures (a BaseException)
            shards = ", ".join(sorted({info.relative_path for info in metadata.storage_data.values()}))
            cause = (str(e).strip() or type(e).__name__).splitlines()[-1]
            raise ValueError(
                f"could not read the tensors of checkpoint {path} (files {shards}): corrupt? {cause}"
            ) from e
        set_model_and_optimizer_state(model, optimizer, state["model"], state["optim"])
        scheduler.load_state_dict(trainer_state["scheduler"])  # its step counter; shape: apply_optim_config
        try:
            loader.load_state_dict(trainer_state["loader"])
        except ValueError as e:
            raise ValueError(
                f"cannot resume {path} on this data: {e}. To train these weights on other data (or with another "
                f"data order), start a new run from them: checkpoint.init_from={path} (and "
                "checkpoint.init_optimizer=true to keep the AdamW moments), with checkpoint.resume=null and a "
                "fresh output_dir"
            ) from None
        rng_file = path / "rng" / f"rank_{self.rank}.json"
        if not rng_file.is_file():
            warnings.warn(
                f"checkpoint {path} was saved by {trainer_state['world_size']} ranks, this is rank {self.rank}: "
                "using rank 0's RNG state",
                UserWarning,
                stacklevel=2,
            )
            rng_file = path / "rng" / "rank_0.json"
        set_rng_state(read_json(rng_file))
        step = int(trainer_state["step"])
        logger.info("resumed from %s (step %d, saved by %d ranks)", path, step, trainer_state["world_size"])
        return step

    def load_weights(
        self, path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """`checkpoint.init_from`: only the model's tensors (and, given `optimizer`, the AdamW state) of `path`,
        into objects built in this run's layout. No step, scheduler, loader position or RNG state is read."""
        path = Path(path)
        if not is_complete(path):
            raise ValueError(f"checkpoint {path} has no {MARKER} marker: it is incomplete")
        saved_model_cfg = self._saved_model_config(path)
        if optimizer is None:
            model_sd = get_model_state_dict(model)
            state = {"model": model_sd}
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        reader, metadata = self._checked_reader(
            path, model_sd, saved_model_cfg, partial=is_pipeline_stage(model)
        )
        if optimizer is not None and not any(
            k.startswith("optim.state.") for k in metadata.state_dict_metadata
        ):
            raise ValueError(f"checkpoint.init_optimizer=true but {path} holds no optimizer state")
        try:
            with single_process_ok():
                dcp.load(without_fresh_bias_state(path, state, metadata), storage_reader=reader)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps ranks' failures
            cause = (str(e).strip() or type(e).__name__).splitlines()[-1]
            raise ValueError(f"could not read the tensors of checkpoint {path}: corrupt? {cause}") from e
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_model_and_optimizer_state(model, optimizer, state["model"], state["optim"])
        what = "weights and optimizer moments" if optimizer is not None else "weights"
        logger.info("initialized the %s from %s (step, schedule and data position start at 0)", what, path)

    def _saved_model_config(self, path: Path) -> dict:
        """The `model` section of the checkpoint's `config.yaml` (ValueError naming the file if unreadable)."""
        return saved_config(path).get("model", {})

    def _checked_reader(
        self, path: Path, model_sd: dict, saved_model_cfg: Any, *, partial: bool = False
    ) -> tuple[Any, Any]:
        """The DCP reader of `path` and its metadata, after the shard files and every tensor shape were checked:
        fail here, with the file or tensor named, rather than deep inside dcp.load. `partial`: the model is one
        pipeline stage, which loads only its own tensors (`plan_start` checked the whole model's)."""
        reader = SafeFileSystemReader(str(path))
        try:
            metadata = reader.read_metadata()
        except FileNotFoundError:
            raise ValueError(f"checkpoint file {path / '.metadata'} is missing") from None
        check_shard_files(path, metadata)
        self._check_shapes(path, model_sd, metadata, saved_model_cfg, partial=partial)
        return reader, metadata

    def _check_shapes(
        self, path: Path, model_sd: dict, metadata: Any, saved_model_cfg: dict, *, partial: bool = False
    ) -> None:
        expected = {key: tuple(value.shape) for key, value in model_sd.items()}  # DTensor: the global shape
        check_model_shapes(
            path,
            expected,
            metadata,
            saved_model_cfg=saved_model_cfg,
            config_yaml=self.config_yaml,
            partial=partial,
        )


def check_model_shapes(
    path: str | Path,
    expected: dict[str, tuple[int, ...]],
    metadata: Any = None,
    *,
    saved_model_cfg: dict | None = None,
    config_yaml: str,
    partial: bool = False,
) -> None:
    """The checkpoint at `path` must hold exactly the tensors `expected` (name -> global shape) with those
    shapes: a ValueError naming the tensors and the `model.*` fields that differ, instead of an error deep
    inside `dcp.load`. Reads only `.metadata` and `config.yaml` (given `metadata`, not even that). `partial`:
    `expected` is one pipeline stage's, so checkpoint tensors of the other stages are not reported."""
    path = Path(path)
    if metadata is None:
        try:
            metadata = SafeFileSystemReader(str(path)).read_metadata()
        except FileNotFoundError:
            raise ValueError(f"checkpoint file {path / '.metadata'} is missing") from None
    if saved_model_cfg is None:
        saved_model_cfg = saved_config(path).get("model", {})
    stored = stored_tensor_shapes(metadata, prefix="model.")
    if partial:
        stored = {key: shape for key, shape in stored.items() if key in expected}
    # bias-update state may be new (its option turned on) or gone (turned off): `without_fresh_bias_state`
    expected = {k: v for k, v in expected.items() if k in stored or not k.endswith(BIAS_UPDATE_STATE)}
    stored = {k: v for k, v in stored.items() if k in expected or not k.endswith(BIAS_UPDATE_STATE)}
    mismatches = tensor_shape_mismatches(expected, stored)
    if mismatches:
        mine = OmegaConf.to_container(OmegaConf.create(config_yaml)).get("model", {})
        fields = [f"model.{k}={w!r} (checkpoint has {v!r})" for k, v, w in config_diff(saved_model_cfg, mine)]
        more = f" (+{len(mismatches) - _SHOW} more)" if len(mismatches) > _SHOW else ""
        raise ValueError(
            f"checkpoint {path} was written for another model shape: "
            f"{'; '.join(fields) or 'the model config is unchanged'}; tensors: "
            + "; ".join(mismatches[:_SHOW])
            + more
        )


def without_fresh_bias_state(path: Path, state: dict, metadata: Any) -> dict:
    """`state` to hand to `dcp.load`: without the bias-update state tensors the checkpoint lacks (a
    `bias_update_rule` or `bias_update_drift` turned on since the save, `check_model_shapes` allows it), which keep
    their initial value (zeros), with a warning. Bias-update state the checkpoint has and the model does not is
    simply not read. The tensors are the same objects: DCP loads into them in place."""
    model_sd = state["model"]
    fresh = [
        k
        for k in model_sd
        if k.endswith(BIAS_UPDATE_STATE) and f"model.{k}" not in metadata.state_dict_metadata
    ]
    if not fresh:
        return state
    warnings.warn(
        f"checkpoint {path} holds no bias-update state for {len(fresh)} tensor(s) ({fresh[0]}, ...): the "
        "model.moe.bias_update_rule / bias_update_drift state starts at 0 (the correction biases are restored)",
        UserWarning,
        stacklevel=3,
    )
    return {**state, "model": {k: v for k, v in model_sd.items() if k not in fresh}}


def stored_tensor_shapes(metadata: Any, *, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor a DCP checkpoint's `metadata` holds under `prefix` (prefix stripped)."""
    return {
        key[len(prefix) :]: tuple(meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }

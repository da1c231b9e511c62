"""`JobConfig`: the whole training job (model, data, layout, optimizer, loop, checkpoints, logging) as one schema.

Registered with Hydra's ConfigStore as `job_schema`; `configs/config.yaml` lists it first in its defaults, so every
YAML value is merged onto these dataclasses and a misspelt key or a wrong type fails at composition time.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from automoe.config.checks import check_choice, check_experts_split, check_sequence_split
from automoe.config.data import DataConfig
from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.config.parallel import ParallelConfig
from automoe.host_memory import HOST_ALLOCATORS

if TYPE_CHECKING:
    from omegaconf import DictConfig

COMPUTE_DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("skip", "stop")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("disabled", "offline", "online")


def _at_least(section: str, obj: object, names: tuple[str, ...], low: float) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < low:
            raise ValueError(f"{section}.{name}={value} must be >= {low}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then decay to `min_lr_ratio * lr`."""

    lr: float = 3e-3  # peak learning rate, reached after warmup_steps
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # decoupled decay on matrices (>= 2-D params); norms, biases get none
    warmup_steps: int = 20  # steps of linear warmup from lr/warmup_steps to lr
    schedule: str = "cosine"  # cosine | linear | constant: decay after warmup until train.steps
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine/linear)
    max_grad_norm: float = 1.0  # clip the global gradient L2 norm to this; <= 0 only measures it

    def __post_init__(self) -> None:
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        _at_least("optim", self, ("eps", "weight_decay", "warmup_steps"), 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


@dataclass
class TrainConfig:
    """The loop: how long, how much data per step, numerics, validation and NaN handling."""

    steps: int = 300  # optimizer steps of the whole run (the lr schedule spans them)
    stop_at_step: Optional[int] = None  # end this invocation after this step (schedule still spans `steps`)
    seed: int = 0  # seeds weight init and every RNG (data order has data.seed)
    global_batch_size: int = 16  # sequences per optimizer step over all ranks (fixed for every layout)
    micro_batch_size: int = 4  # sequences per forward/backward on one rank (grad accumulation fills the rest)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (autocast; params and optimizer stay fp32)
    val_interval: int = 100  # validate every n steps and after the last one; 0 disables validation
    val_max_batches: Optional[int] = 4  # global batches per validation; None = the whole val split
    nan_policy: str = "stop"  # non-finite loss or grad norm: stop (raise) | skip (drop the update)
    nan_max_skips: int = 10  # skip policy: stop after this many consecutive skipped steps
    first_loss_guard: bool = (
        True  # after loading weights (hf.init_from): stop if step 1's loss >= ln(vocab) - 1
    )
    deterministic: bool = (
        False  # deterministic algorithms and kernels: bitwise repeatable runs, some speed cost
    )
    host_allocator: str = (
        "cached"  # CPU memory: cached (glibc keeps freed blocks for reuse) | system (defaults)
    )

    def __post_init__(self) -> None:
        check_choice("train.dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("train.nan_policy", self.nan_policy, NAN_POLICIES)
        check_choice("train.host_allocator", self.host_allocator, HOST_ALLOCATORS)
        _at_least("train", self, ("steps", "global_batch_size", "micro_batch_size", "nan_max_skips"), 1)
        _at_least("train", self, ("seed", "val_interval"), 0)
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.steps:
            raise ValueError(
                f"train.stop_at_step={self.stop_at_step} must be in [1, train.steps={self.steps}]"
            )
        if self.val_max_batches is not None and self.val_max_batches < 1:
            raise ValueError(f"train.val_max_batches={self.val_max_batches} must be >= 1 or null (all)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class CheckpointConfig:
    """Distributed checkpoints in `output_dir/checkpoints/step_<N>/`."""

    interval: int = 100  # save every n steps (and after the last step); 0 disables saving
    resume: Optional[str] = (
        None  # null (fresh start) | latest (newest complete; fresh if none) | a step_<N> dir
    )
    init_from: Optional[str] = (
        None  # a step_<N> dir: start a new run from its weights (step, data, schedule reset)
    )
    init_optimizer: bool = False  # with init_from: also load its AdamW moments (hyperparameters from optim.*)
    keep_last_n: int = 2  # complete checkpoints kept (older ones deleted); 0 keeps all
    async_save: bool = (
        False  # write tensors in the background on a dedicated gloo group; marker after it ends
    )

    def __post_init__(self) -> None:
        _at_least("checkpoint", self, ("interval", "keep_last_n"), 0)
        if self.resume is not None and not str(self.resume).strip():
            raise ValueError(
                f"checkpoint.resume={self.resume!r} must be null, 'latest' or a checkpoint directory"
            )
        if self.init_from is not None and not str(self.init_from).strip():
            raise ValueError(f"checkpoint.init_from={self.init_from!r} must be null or a step_<N> directory")
        if self.init_optimizer and self.init_from is None:
            raise ValueError("checkpoint.init_optimizer=true needs checkpoint.init_from=<step_N dir>")


@dataclass
class WandbConfig:
    """Weights & Biases mirror of metrics.jsonl (rank 0 only)."""

    mode: str = "offline"  # disabled | offline (files under output_dir/wandb, no network) | online
    project: str = "automoe"  # wandb project name
    name: Optional[str] = None  # run name; None = the output_dir's last component

    def __post_init__(self) -> None:
        check_choice("logging.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl, wandb and the expert-load heatmap."""

    log_interval: int = 10  # console summary line every n steps (and the first and last step)
    progress_bar: bool = True  # tqdm progress bar with ETA on rank 0
    heatmap: bool = True  # save output_dir/expert_load_heatmap.png (layers x experts over steps) at the end
    loss_curve: bool = True  # save output_dir/loss_curve.png (train and validation loss, lr) at the end
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _at_least("logging", self, ("log_interval",), 1)


def _model_schema_default() -> ModelConfig:
    """ModelConfig() with its derived fields put back to "derive me", so YAML that omits them still derives."""
    model = ModelConfig()
    model.head_dim = None
    model.moe = MoEConfig()
    return model


@dataclass
class HFConfig:
    """Hugging Face interop of a run (docs/hf_interop.md): start from an HF checkpoint, export the result as one."""

    init_from: Optional[str] = None  # HF dir or cached hub id: its weights replace the random init
    export_to: Optional[str] = None  # after the last step write the model here as an HF dir; null = don't
    family: Optional[str] = (
        None  # export layout: an automoe.hf.FAMILIES name; null = init_from's, else the first that fits
    )


@dataclass
class JobConfig:
    """Everything one training run reads. Hydra fills it from `configs/`; overrides are `key=value`."""

    output_dir: str = "outputs/run"  # metrics.jsonl, config.yaml, checkpoints/, heatmap; same on every rank
    model: ModelConfig = field(default_factory=_model_schema_default)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hf: HFConfig = field(default_factory=HFConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError(f"output_dir={self.output_dir!r} must be a directory path")
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        # Layout checks that need no world size (the rest fail in ParallelDims, still before any collective).
        if self.model.num_moe_layers:
            check_experts_split(self.model.moe.num_experts, self.parallel.ep)
        check_sequence_split(self.data.seq_len, self.parallel.cp)
        _check_writable("output_dir", self.output_dir)
        if self.checkpoint.init_from is not None and self.hf.init_from is not None:
            raise ValueError(
                f"checkpoint.init_from={self.checkpoint.init_from!r} and hf.init_from={self.hf.init_from!r} "
                "both give the initial weights: set one of them"
            )


def _check_writable(name: str, directory: str) -> None:
    """`directory` exists as a writable directory, or can be created: its nearest existing ancestor is one."""
    path = Path(directory).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{name}={directory!r} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={directory!r} is not writable: no write permission on {existing}")


def schema_keys(schema: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves), e.g. `train`, `train.steps`, `model.moe.dim`."""
    import typing

    schema = JobConfig if schema is None else schema
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that its typed schema does not have.

    Hydra's `+key=value` and `++key=value` add keys even to a typed (struct) config, and `OmegaConf.to_object`
    drops what no dataclass field takes, so without this check `+train.step=5` would train 300 steps silently.
    """
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    names = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key in node:
        if key not in names:
            out.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out += unknown_keys(child, f"{prefix}{key}.")
    return out


def closest_key(key: str) -> str | None:
    """The schema key most like `key` (same section first, then anywhere), or None when nothing is close."""
    keys = schema_keys()
    section, _, _ = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == section]
    for pool in (siblings, keys):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    leaf = key.rpartition(".")[2]
    by_leaf = {k.rpartition(".")[2]: k for k in keys}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[match[0]] if match else None


def to_job_config(dict_cfg: DictConfig) -> JobConfig:
    """A composed Hydra config as a typed `JobConfig`: unknown keys (also ones added with `+`/`++`) fail, naming
    the closest existing key; then every `__post_init__` check runs."""
    from omegaconf import OmegaConf

    extra = unknown_keys(dict_cfg)
    if extra:
        hints = []
        for key in extra:
            close = closest_key(key)
            hints.append(f"'{key}'" + (f" (did you mean '{close}'?)" if close else ""))
        raise ValueError(
            f"unknown config key{'s' if len(extra) > 1 else ''} {', '.join(hints)}: JobConfig has no such key "
            "(a '+key=' or '++key=' override adds nothing to the typed schema). Every key is listed in "
            "docs/configuration.md"
        )
    return OmegaConf.to_object(dict_cfg)


def register_configs() -> None:
    """Store the schema as `job_schema` so `configs/config.yaml` can list it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=JobConfig)

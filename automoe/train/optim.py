"""AdamW with decay/no-decay parameter groups, and the warmup + cosine/linear/constant learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from automoe.config.job import OptimConfig
from automoe.tensors import is_sharded


def is_bias(name: str) -> bool:
    """Whether parameter `name` is a bias: `bias`, or a stacked per-expert bias `b_*` (`b_up [E, H]`)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.startswith("b_")


def _decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters: matrices (>= 2-D) decay; norms and biases do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not is_bias(name) else no_decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters: weight decay on matrices (>= 2-D), none on norms and biases.

    Biases are told by name (`is_bias`), since per-expert biases are 2-D. Works on sharded (DTensor)
    parameters; call after `parallelize` and materialization.
    """
    decay, no_decay = _decay_split(model)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one pass over each tensor instead of ~10 elementwise ops (torch's CPU default is the per-tensor
    # loop): 6.9x faster measured on 50M fp32 params, 1 thread; it also runs on DTensors of mixed meshes, but not on
    # a mix of DTensors and plain tensors (EP or PP without FSDP: sharded experts, replicated dense parameters)
    params = decay + no_decay
    mixed = len({is_sharded(p) for p in params}) > 1
    fused = not mixed and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )


class WarmupDecay:
    """lr multiplier at step s (0-based): linear warmup to 1, then decay to `min_ratio` at `total_steps`.

    Warmup: (s + 1) / warmup_steps for s < warmup_steps. Decay over p = (s - warmup) / (total - warmup) in
    [0, 1]: cosine `min + (1 - min) * (1 + cos(pi p)) / 2`, linear `1 - (1 - min) p`, or constant 1.
    A plain-number object, so `LambdaLR.state_dict()` holds only numbers (saved as JSON in checkpoints).
    """

    def __init__(self, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.schedule = schedule
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.schedule == "linear":
            return 1.0 - (1.0 - self.min_ratio) * progress
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` with `WarmupDecay`: step s of the run trains with lr * WarmupDecay(s); call `.step()` after it."""
    fn = WarmupDecay(
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        schedule=cfg.schedule,
        min_ratio=cfg.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fn)


def apply_optim_config(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: OptimConfig,
    *,
    total_steps: int,
) -> None:
    """After a checkpoint's optimizer and scheduler state were loaded: this run's settings win.

    Kept from the checkpoint: the AdamW moments and per-parameter step counts, and the scheduler's step counter
    (`last_epoch`). Taken from `cfg` and `total_steps` (= train.steps): lr, betas, eps, weight decay and the
    schedule's shape and length, so a resumed run trains with what its config.yaml says, not with the saved
    run's values (which `Optimizer.load_state_dict` and `LambdaLR.load_state_dict` would otherwise restore).
    With unchanged settings every value is recomputed exactly as before (bitwise).
    """
    decay_ids = {id(p) for p in _decay_split(model)[0]}
    fn = WarmupDecay(
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        schedule=cfg.schedule,
        min_ratio=cfg.min_lr_ratio,
    )
    for group in optimizer.param_groups:
        decays = any(id(p) in decay_ids for p in group["params"])
        group.update(
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay if decays else 0.0,
            initial_lr=cfg.lr,
        )
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler.lr_lambdas = [fn] * len(optimizer.param_groups)
    step = scheduler.last_epoch
    for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(step)  # what LambdaLR.get_lr computes at this step
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

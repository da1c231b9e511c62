"""Training: the loop (`Trainer`), AdamW + schedule, DCP checkpoints, metrics/logging, and the job builder."""

from automoe.train.build import build_trainer, config_to_yaml
from automoe.train.checkpoint import Checkpointer, latest_checkpoint, resolve_resume
from automoe.train.metrics import MetricsLogger, expert_load_stats, read_metrics, save_expert_load_heatmap
from automoe.train.optim import WarmupDecay, build_optimizer, build_scheduler
from automoe.train.trainer import CollectiveError, NonFiniteError, Trainer

__all__ = [
    "Checkpointer",
    "CollectiveError",
    "MetricsLogger",
    "NonFiniteError",
    "Trainer",
    "WarmupDecay",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "config_to_yaml",
    "expert_load_stats",
    "latest_checkpoint",
    "read_metrics",
    "resolve_resume",
    "save_expert_load_heatmap",
]

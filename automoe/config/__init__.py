"""Typed configuration dataclasses (the schema every YAML file fills)."""

from automoe.config.data import DataConfig
from automoe.config.job import (
    CheckpointConfig,
    JobConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
    WandbConfig,
    register_configs,
)
from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.config.parallel import ParallelConfig

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "JobConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "WandbConfig",
    "register_configs",
]

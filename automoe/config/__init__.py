"""Typed configuration dataclasses (the schema every YAML file fills)."""

from automoe.config.moe import MoEConfig

__all__ = ["MoEConfig"]

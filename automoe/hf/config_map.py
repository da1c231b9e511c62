"""Hugging Face `config.json` <-> `ModelConfig`, through the family registry (`automoe/hf/families/`).

Settings that change the numerics and that automoe does not implement raise `ValueError` naming the key and
value (sliding windows, other rope types, other activations, quantizations other than block fp8, ...); purely
descriptive keys (token ids, cache flags, versions) are ignored. Each family's module says what it maps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from automoe.config.model import ModelConfig
from automoe.hf.families import FAMILIES, family_for_model_type, get_family

__all__ = ["FAMILIES", "config_from_hf", "config_to_hf", "read_hf_config"]


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of an HF checkpoint directory."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"no config.json in HF checkpoint directory {str(path)!r}")
    return json.loads(file.read_text())


def config_from_hf(
    hf: dict[str, Any], *, max_seq_len: int | None = None, dtype: str = "float32"
) -> tuple[ModelConfig, str]:
    """-> (ModelConfig, family name) for a parsed HF `config.json`.

    `max_seq_len` bounds the RoPE tables (default: `max_position_embeddings`); `dtype` is the parameter dtype.
    """
    family = family_for_model_type(hf.get("model_type"))
    return family.to_model_config(hf, max_seq_len=max_seq_len, dtype=dtype), family.name


def config_to_hf(cfg: ModelConfig, *, family: str) -> dict[str, Any]:
    """The HF `config.json` dict describing `cfg` as a `family` model (raises, naming the setting, if it cannot)."""
    return get_family(family).to_hf_config(cfg)

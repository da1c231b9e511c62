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
from automoe.hf.safetensors_io import SafetensorsReader

__all__ = ["FAMILIES", "config_from_hf", "config_to_hf", "read_hf_config"]


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of an HF checkpoint directory, as its tensors have it (`Family.checkpoint_config`:
    declared multi-token-prediction layers that the directory does not hold are dropped) when the directory has
    weights and a known `model_type`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"no config.json in HF checkpoint directory {str(path)!r}")
    hf = json.loads(file.read_text())
    if hf.get("model_type") not in {t for f in FAMILIES.values() for t in f.model_types}:
        return hf  # a dense model (upcycling) or an unsupported one, refused where it is imported
    try:
        keys = SafetensorsReader(path).keys()  # the index or the headers only
    except ValueError:
        return hf  # no weights (yet): the config as written
    return family_for_model_type(hf["model_type"]).checkpoint_config(hf, keys)


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

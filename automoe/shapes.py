"""Whether stored tensors fit a model, told from shapes alone, and the config fields that differ: shared by the
resume check (`train/checkpoint.py`) and the HF fine-tune check (`hf/finetune.py`)."""

from __future__ import annotations

from typing import Any


def tensor_shape_mismatches(
    expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]
) -> list[str]:
    """Why tensors `stored` (name -> global shape) cannot fill a model expecting `expected`, one line per
    tensor: another shape, missing from the checkpoint, or not in the model. Empty when they match exactly."""

    def fmt(shape: tuple[int, ...]) -> str:
        return str(list(shape))

    out = []
    for key, shape in expected.items():
        if key not in stored:
            out.append(f"{key}: this model has shape {fmt(shape)}, not in the checkpoint")
        elif tuple(stored[key]) != tuple(shape):
            out.append(f"{key}: this model has shape {fmt(shape)}, checkpoint has shape {fmt(stored[key])}")
    out += [
        f"{key}: not in this model, checkpoint has shape {fmt(shape)}"
        for key, shape in stored.items()
        if key not in expected
    ]
    return out


def config_diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Leaves that differ between two nested config dicts, as (dotted key, value in a, value in b)."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append((f"{prefix}{key}", x, y))
    return out

"""The registry of Hugging Face model families: every module of this package (but `base`) defines `FAMILY`, a
`Family` (see `base.py`), and is found here. Import, export, the converter and the fine-tune recipe go through
`get_family` / `family_for_model_type` only, so a new family is one module (and its tests)."""

from __future__ import annotations

import importlib
import pkgutil

from automoe.hf.families.base import Family


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family) or family.name != info.name:
            raise RuntimeError(
                f"automoe/hf/families/{info.name}.py must define FAMILY, a Family named {info.name!r}"
            )
        found[family.name] = family
    return found


FAMILIES: dict[str, Family] = _discover()  # name -> Family, sorted by name
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def get_family(name: str) -> Family:
    """The family called `name` (the `family=` of export, `hf.family`, `--family`)."""
    if name not in FAMILIES:
        raise ValueError(f"family={name!r} is not one of {list(FAMILIES)}")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None) -> Family:
    """The family reading HF `config.json` files of `model_type`."""
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"HF config model_type={model_type!r} is not supported: supported families are {list(FAMILIES)}"
        )
    return _BY_MODEL_TYPE[model_type]


__all__ = ["FAMILIES", "Family", "family_for_model_type", "get_family"]

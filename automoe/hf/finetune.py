"""Fine-tuning from an HF checkpoint: the model config a run gets from `config.json`, and the checks that the
run's `model` section can hold the checkpoint (before any process group or tensor read)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.hf.checkpoint import expected_tensors
from automoe.hf.config_map import config_from_hf, read_hf_config
from automoe.hf.families import FAMILIES, family_for_model_type, get_family
from automoe.hf.safetensors_io import SafetensorsReader
from automoe.shapes import config_diff, tensor_shape_mismatches

_SHOW = 6  # mismatched tensors named in a shape error (then '+N more')


def hf_model_config(
    hf_dir: str | Path, *, overrides: dict[str, Any] | None = None
) -> tuple[ModelConfig, str]:
    """-> (ModelConfig, family) read from `hf_dir/config.json`, with `overrides` (nested dict of `model.*` keys
    the user gave, e.g. `{"max_seq_len": 512, "moe": {"aux_loss_coeff": 0.01}}`) merged on top."""
    cfg, family = config_from_hf(read_hf_config(hf_dir))
    if overrides:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), overrides)
        cfg = OmegaConf.to_object(merged)
    return cfg, family


def check_hf_init(model_cfg: ModelConfig, hf_dir: str | Path) -> tuple[str, list[str]]:
    """Validate `hf.init_from=hf_dir` against the run's model config; -> (family, notes on changed fields).

    What may change is derived from the tensors, as for resuming (`automoe.shapes`): the expected shapes of both
    configs are built on the meta device. Raises ValueError naming the differing fields and the tensors when the
    checkpoint's tensors cannot fill this model (another shape), or when the directory is not a readable HF
    checkpoint. Fields that differ but keep every shape (e.g. `moe.num_activated_experts`, `moe.aux_loss_coeff`)
    come back as notes for the caller to log. Reads only `config.json` and the safetensors headers.
    """
    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"hf.init_from={str(hf_dir)!r} has no config.json (is it a Hugging Face model dir?)")
    hf_cfg, family = config_from_hf(
        read_hf_config(path), max_seq_len=model_cfg.max_seq_len, dtype=model_cfg.dtype
    )
    SafetensorsReader(path)  # raises ValueError when there are no weights
    diffs = config_diff(dataclasses.asdict(model_cfg), dataclasses.asdict(hf_cfg))
    text = [f"model.{k}={x!r} (config.json gives {y!r})" for k, x, y in diffs]
    mine = {k: v[0] for k, v in expected_tensors(model_cfg).items()}
    theirs = {k: v[0] for k, v in expected_tensors(hf_cfg).items()}
    mismatches = tensor_shape_mismatches(mine, theirs)
    if mismatches:
        more = f" (+{len(mismatches) - _SHOW} more)" if len(mismatches) > _SHOW else ""
        raise ValueError(
            f"hf.init_from={str(hf_dir)!r} holds a model of another shape: "
            f"{'; '.join(text) or 'the model config is unchanged'}; tensors: "
            + "; ".join(mismatches[:_SHOW])
            + more
        )
    return family, text


def export_family(
    hf_init_from: str | None, family: str | None, model_cfg: ModelConfig | None = None
) -> str | None:
    """The HF family to export to: `hf.family`, else the family of `hf.init_from`'s `model_type`, else (given
    `model_cfg`) the first family that can express the model, else None.

    With `model_cfg`, also checks that the family can express it (raises ValueError naming the setting), so a run
    that could not be exported fails before training, not after it.
    """
    if family is not None:
        try:
            spec = get_family(family)
        except ValueError as err:
            raise ValueError(f"hf.{err}") from None
    elif hf_init_from is not None:
        spec = family_for_model_type(read_hf_config(hf_init_from).get("model_type"))
    elif model_cfg is not None:
        return expressing_family(model_cfg)
    else:
        return None
    if model_cfg is not None:
        spec.check_expressible(model_cfg)
    return spec.name


def expressing_family(model_cfg: ModelConfig) -> str:
    """The first family of `FAMILIES` that can express `model_cfg`; ValueError giving each family's reason."""
    reasons = []
    for name, spec in FAMILIES.items():
        try:
            spec.check_expressible(model_cfg)
        except ValueError as err:
            reasons.append(f"  {name}: {err}")
            continue
        return name
    raise ValueError(
        "hf.export_to: no Hugging Face family can express this model, so it cannot be exported:\n"
        + "\n".join(reasons)
        + "\nChange the setting a family names (e.g. the default tiny model exports as qwen2_moe with "
        "model.moe.shared_expert_gate=true), or leave hf.export_to unset"
    )


def export_after_fit(cfg: Any):
    """The `after_fit` callback of a run with `hf.export_to`: every rank gathers its shards, rank 0 writes the model
    as an HF directory of `export_family(...)`."""
    import logging

    from automoe.hf.checkpoint import save_hf_checkpoint

    family = export_family(cfg.hf.init_from, cfg.hf.family, cfg.model)

    def export(trainer: Any, env: Any) -> None:
        files = save_hf_checkpoint(trainer.model, cfg.model, cfg.hf.export_to, family=family)
        if env.is_main:
            logging.getLogger("automoe").info(
                "exported the model as an HF %s directory %s: %s", family, cfg.hf.export_to, ", ".join(files)
            )

    return export

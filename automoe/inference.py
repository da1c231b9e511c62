"""Load a trained model for use in one process (generate, evaluate): from any form automoe writes or reads.

`load_model(path)` accepts
  - a run's `output_dir` (its newest complete checkpoint) or one `checkpoints/step_<N>/` directory, written by any
    training layout (DCP reshards on load);
  - a Hugging Face model directory (config.json + safetensors) of a family in `automoe.hf.FAMILIES`, or a hub id
    already in the local HF cache;
  - a directory written by `python -m automoe.convert hf-to-automoe` (model_config.yaml).
and finds the tokenizer the model was trained with (`LoadedModel.tokenizer`; None when unknown).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from automoe.models import Transformer

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Transformer  # eval mode, on the requested device
    tokenizer: Tokenizer | None  # the tokenizer of the training data (None: unknown; pass ids)
    source: str  # what was loaded, for messages
    job: dict[str, Any] | None = None  # a trainer checkpoint's resolved job config (data, train, ...)
    step_dir: Path | None = None  # the trainer checkpoint read


def find_step_dir(path: Path) -> Path | None:
    """`path` as a complete trainer checkpoint: itself (step_<N>), or the newest one of an output_dir."""
    from automoe.train.checkpoint import check_step_dir, latest_checkpoint

    if (path / "trainer_state.json").is_file():
        return check_step_dir(path, key="checkpoint")
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise ValueError(f"{path}/checkpoints holds no complete step_<N> checkpoint")
        return latest
    return None


def model_config(section: dict[str, Any]) -> ModelConfig:
    """A saved `model:` section (resolved YAML) as a ModelConfig."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
    return OmegaConf.to_object(merged)


def build_empty(cfg: ModelConfig, device: torch.device | str = "cpu") -> Transformer:
    """A model with initialized buffers (RoPE tables) whose parameters a load then overwrites."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


def data_tokenizer(job: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer a run (its resolved job config) trained with: `data.tokenizer`, the token file's sidecar,
    `hf.init_from`'s, or the byte tokenizer (synthetic ids: its layout with `synthetic_vocab_size` content ids);
    None when unknown."""
    from automoe.data.tokenizer_check import has_tokenizer

    data, init_from = job.get("data", {}), (job.get("hf") or {}).get("init_from")
    if data.get("tokenizer"):
        return load_tokenizer(data["tokenizer"], key="data.tokenizer")
    if data.get("source") == "tokens" and data.get("path"):
        sidecar = Path(data["path"]).with_suffix(".json")
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            if meta.get("tokenizer_path"):
                return load_tokenizer(meta["tokenizer_path"], key=f"{sidecar}: tokenizer_path")
            if meta.get("tokenizer") in ("byte", "ByteTokenizer") and meta.get("vocab_size") == 259:
                return ByteTokenizer()
        return None
    if init_from and has_tokenizer(init_from):
        return load_tokenizer(init_from, key="hf.init_from")
    if data.get("source") == "synthetic":  # ids of a Markov chain; with 256 content ids they decode as bytes
        return ByteTokenizer(data.get("synthetic_vocab_size", 256))
    return ByteTokenizer()


def load_model(
    path: str | Path, *, device: torch.device | str = "cpu", max_seq_len: int | None = None
) -> LoadedModel:
    """The model at `path` (see the module docstring) in eval mode. `max_seq_len` overrides the RoPE table
    length (HF default: `max_position_embeddings`)."""
    spec = str(path)
    path = Path(path)
    step_dir = find_step_dir(path) if path.is_dir() else None
    if step_dir is not None:
        return _load_trainer_checkpoint(step_dir, device=device, max_seq_len=max_seq_len)
    if path.is_dir() and (path / "model_config.yaml").is_file():
        from automoe.convert import read_automoe

        cfg, state = read_automoe(path)
        model = build_empty(cfg, device)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"output.weight"} if cfg.tie_embeddings else set()
        if unexpected or set(missing) - tied:  # a tied head is not stored; it shares tok_embeddings.weight
            raise ValueError(
                f"{path}: tensors missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
            )
        return LoadedModel(cfg, model.eval(), None, f"automoe checkpoint {path}")
    from automoe.hf import load_hf_checkpoint
    from automoe.hf.hub import resolve_local

    hf_dir = resolve_local(spec, key="model")
    if not (hf_dir / "config.json").is_file():
        raise ValueError(
            f"model={spec!r} is not a run's output_dir, a step_<N> checkpoint, a converted automoe checkpoint "
            "(model_config.yaml) or a Hugging Face model directory (config.json)"
        )
    cfg, model = load_hf_checkpoint(hf_dir, build_model=True, max_seq_len=max_seq_len)
    tokenizer = None
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(hf_dir), key="model")
    return LoadedModel(cfg, model.to(device).eval(), tokenizer, f"Hugging Face model {hf_dir}")


def _load_trainer_checkpoint(step_dir: Path, *, device, max_seq_len: int | None) -> LoadedModel:
    from automoe.train.checkpoint import Checkpointer, saved_config

    job = saved_config(step_dir)
    cfg = model_config(job["model"])
    model = build_empty(cfg, device)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create({"model": job["model"]}))
    Checkpointer(step_dir.parent, config_yaml=config_yaml).load_weights(step_dir, model=model)
    if max_seq_len is not None and max_seq_len != cfg.max_seq_len:
        raise ValueError(
            f"max_seq_len={max_seq_len}: a trainer checkpoint keeps model.max_seq_len={cfg.max_seq_len}"
        )
    tokenizer = data_tokenizer(job)
    return LoadedModel(cfg, model.eval(), tokenizer, f"checkpoint {step_dir}", job=job, step_dir=step_dir)

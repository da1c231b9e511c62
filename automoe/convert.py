"""Convert checkpoints between the Hugging Face layout and automoe's.

    python -m automoe.convert hf-to-automoe HF_DIR OUT_DIR [--format dcp|torch] [--max-seq-len N]
    python -m automoe.convert automoe-to-hf AUTOMOE_DIR OUT_DIR --family deepseek_v3 [--max-shard-size 5GB]
        [--dtype bfloat16] [--expert-layout per_expert|fused]

The HF side may be any family of `automoe.hf.FAMILIES` (`--family`, read from `config.json` on import), with
experts stored one tensor per expert or fused into 3-D tensors, and block-fp8 weights (dequantized on import).

An automoe checkpoint directory holds `model_config.yaml` (the resolved ModelConfig) and either a DCP
checkpoint in `model/` (state dict `{"model": ...}`, loadable at any parallel layout) or `model.pt`
(a plain `torch.save` of the state dict). Both directions run in one process and hold the whole model.

To fine-tune, no conversion is needed: `recipes/finetune.py hf.init_from=HF_DIR` (or `hf.init_from` with
pretrain.py) reads the HF directory directly, each rank only its own experts. A converted directory is not a
`checkpoint.resume` target on purpose: resuming restores the optimizer moments, lr schedule, data position,
RNG states and step of an interrupted run, none of which a converted checkpoint has (inventing them would
override the new run's optim/train/data settings). Its DCP keys (`model.<name>`) are the ones the trainer's
checkpoints use for the model; `read_automoe` below shows how to load them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.hf import FAMILIES, load_hf_checkpoint, save_hf_checkpoint
from automoe.hf.adapters import EXPERT_LAYOUTS
from automoe.models import Transformer

CONFIG_NAME = "model_config.yaml"


def hf_to_automoe(src: Path, dst: Path, *, fmt: str, max_seq_len: int | None) -> None:
    cfg, state = load_hf_checkpoint(src, max_seq_len=max_seq_len)
    dst.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), dst / CONFIG_NAME)
    if fmt == "torch":
        torch.save(state, dst / "model.pt")
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": state}, checkpoint_id=str(dst / "model"))
    print(f"wrote {len(state)} tensors of a {cfg.num_layers}-layer model to {dst} ({fmt})")


def read_automoe(src: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The (ModelConfig, state dict) of an automoe checkpoint directory written by `hf-to-automoe`."""
    schema = OmegaConf.structured(ModelConfig)
    cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(src / CONFIG_NAME)))
    if (src / "model.pt").is_file():
        return cfg, torch.load(src / "model.pt", weights_only=True)
    import torch.distributed.checkpoint as dcp

    model = Transformer(cfg)  # the target tensors DCP loads into
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "output.weight")}
    wrapped = {"model": state}
    dcp.load(wrapped, checkpoint_id=str(src / "model"))
    return cfg, wrapped["model"]


def automoe_to_hf(
    src: Path,
    dst: Path,
    *,
    family: str,
    max_shard_size: str,
    dtype: str | None,
    expert_layout: str = "per_expert",
) -> None:
    cfg, state = read_automoe(src)
    files = save_hf_checkpoint(
        state,
        cfg,
        dst,
        family=family,
        max_shard_size=max_shard_size,
        dtype=dtype,
        expert_layout=expert_layout,
    )
    print(f"wrote {len(files)} files to {dst}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_ours = sub.add_parser("hf-to-automoe", help="HF directory -> automoe checkpoint directory")
    to_ours.add_argument("src", type=Path)
    to_ours.add_argument("dst", type=Path)
    to_ours.add_argument("--format", choices=("dcp", "torch"), default="dcp")
    to_ours.add_argument("--max-seq-len", type=int, default=None, help="RoPE table length (default: HF's)")
    to_hf = sub.add_parser("automoe-to-hf", help="automoe checkpoint directory -> HF directory")
    to_hf.add_argument("src", type=Path)
    to_hf.add_argument("dst", type=Path)
    to_hf.add_argument("--family", choices=list(FAMILIES), required=True)
    to_hf.add_argument("--max-shard-size", default="5GB")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    to_hf.add_argument(
        "--expert-layout",
        choices=EXPERT_LAYOUTS,
        default="per_expert",
        help="one tensor per expert (loads in transformers 4 and 5) or fused 3-D tensors (transformers 5)",
    )
    args = parser.parse_args(argv)
    if args.command == "hf-to-automoe":
        hf_to_automoe(args.src, args.dst, fmt=args.format, max_seq_len=args.max_seq_len)
    else:
        automoe_to_hf(
            args.src,
            args.dst,
            family=args.family,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            expert_layout=args.expert_layout,
        )


if __name__ == "__main__":
    main()

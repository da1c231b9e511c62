"""Evaluate a model: mean cross-entropy, perplexity (and bits per byte for byte-level data) over a whole split.

    python -m automoe.evaluate outputs/run                       # the run's validation split, newest checkpoint
    python -m automoe.evaluate outputs/run/checkpoints/step_300 --split train --max-batches 20
    python -m automoe.evaluate HF_DIR --tokens data/tok/train_val.bin --seq-len 1024
    torchrun --nproc-per-node 2 -m automoe.evaluate outputs/run parallel.ep=2   # any layout

The model is a run's output_dir (its newest checkpoint) or a step_<N> checkpoint of any training layout, or a
Hugging Face directory / cached hub id (then give `--tokens`). The data is the checkpoint's own split (its
`data` config, rebuilt exactly as in training) or a token file written by `python -m automoe.prepare_data`. The
batches and the loss are the trainer's validation (`val_batches`, `micro_batch_ce_sum`), so evaluating the data a
run validated on reproduces its logged `val_loss` (with `train.val_max_batches=null`). Trailing `key=value`
words override the job config (layout: `parallel.ep=2`, `parallel.cp=2`; default: data parallel over every rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from automoe import parallel
from automoe.config.data import DataConfig
from automoe.config.job import JobConfig
from automoe.data import IGNORE_INDEX, TokenDataset, build_datasets, read_token_file, val_batches
from automoe.data.tokenizer import NUM_BYTES
from automoe.data.tokenizer_check import check_data_tokenizer, data_tokenizer, data_tokenizer_infos
from automoe.models import Transformer

logger = logging.getLogger("automoe.evaluate")
SINGLE_LAYOUT = {"dp_replicate": 1, "dp_shard": -1, "cp": 1, "ep": 1, "compile": False}


def job_config(model: str, overrides: list[str]) -> tuple[JobConfig, Path | None, str | None]:
    """-> (the job config to evaluate with, the trainer checkpoint or None, the HF dir or None)."""
    from automoe.inference import find_step_dir

    path = Path(model)
    step_dir = find_step_dir(path) if path.is_dir() else None
    if step_dir is not None:
        from automoe.train.checkpoint import saved_config

        base = saved_config(step_dir)
        base["output_dir"] = str(step_dir.parent.parent)  # where the checkpoint is now (it may have moved)
        hf_dir = None
    else:
        from automoe.hf.finetune import hf_model_config
        from automoe.hf.hub import resolve_local

        hf_dir = str(resolve_local(model, key="model"))
        model_cfg, _ = hf_model_config(hf_dir)
        base = {"model": OmegaConf.to_container(OmegaConf.structured(model_cfg))}
    base.setdefault("parallel", {}).update(SINGLE_LAYOUT)
    base["checkpoint"] = {"resume": None, "init_from": None}
    # hf.init_from stays: it names the tokenizer a fine-tune's text was encoded with (the weights come from above)
    base["hf"] = {
        "init_from": (base.get("hf") or {}).get("init_from", hf_dir),
        "export_to": None,
        "family": None,
    }
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), base, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged), step_dir, hf_dir


def eval_dataset(cfg: JobConfig, *, tokens: str | None, split: str) -> tuple[TokenDataset, bool]:
    """-> (the dataset to evaluate, whether its ids are bytes of the byte tokenizer). A token file must be in the
    model's tokenizer (`check_data_tokenizer`, as at the start of training)."""
    if tokens is not None:
        check_data_tokenizer(
            dataclasses.replace(cfg, data=DataConfig(source="tokens", path=tokens, seq_len=cfg.data.seq_len))
        )
        ids, meta = read_token_file(tokens, field="tokens")
        pad = meta["pad_id"] if meta.get("pad_id") is not None else meta["eos_id"]
        dataset = TokenDataset(
            ids,
            seq_len=cfg.data.seq_len,
            vocab_size=int(meta["vocab_size"]),
            eos_id=int(meta["eos_id"]),
            pad_id=int(pad),
            name=Path(tokens).name,
            document_masking=True if cfg.data.document_masking is None else cfg.data.document_masking,
        )
        byte_level = (
            meta.get("tokenizer") in ("byte", "ByteTokenizer") and meta["vocab_size"] == NUM_BYTES + 3
        )
        return dataset, byte_level
    train, val = build_datasets(cfg.data, data_tokenizer(cfg))
    if split == "val" and val is None:
        raise ValueError(
            "--split val: the checkpoint's data config holds out no validation split; use --tokens"
        )
    infos = data_tokenizer_infos(cfg)
    byte_level = bool(infos) and infos[0].get("tokenizer") in ("byte", "ByteTokenizer")
    byte_level = byte_level and infos[0]["vocab_size"] == NUM_BYTES + 3
    return (val if split == "val" else train), byte_level


def build_model(cfg: JobConfig, env: parallel.DistEnv, dims: parallel.ParallelDims, *, step_dir, hf_dir):
    """The model in `cfg.parallel`'s layout with the weights of `step_dir` (any saved layout) or `hf_dir`."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallel.parallelize(model, dims, cfg.parallel)
    model.to_empty(device=env.device)
    model.init_weights()  # the buffers (RoPE tables); every parameter is then overwritten
    if step_dir is not None:
        from automoe.train.build import config_to_yaml
        from automoe.train.checkpoint import Checkpointer

        Checkpointer(step_dir.parent, config_yaml=config_to_yaml(cfg)).load_weights(step_dir, model=model)
    else:
        from automoe.hf import load_hf_weights

        load_hf_weights(model, hf_dir)
    return model.eval()


@torch.no_grad()
def evaluate(
    cfg: JobConfig,
    env: parallel.DistEnv,
    dataset: TokenDataset,
    *,
    step_dir: Path | None,
    hf_dir: str | None,
    max_batches: int | None = None,
    byte_level: bool = False,
) -> dict[str, Any]:
    """Mean CE over `dataset` (every window once, or `max_batches` global batches) on every rank of the layout.

    -> {"loss" (nats per predicted token), "perplexity", "num_tokens"}; with `byte_level` also "num_bytes" (the
    predicted tokens that are bytes: EOS is not) and "bits_per_byte" (the summed loss in bits / num_bytes)."""
    from automoe.train.build import check_layout
    from automoe.train.loss import micro_batch_ce_sum

    cfg.train.global_batch_size = cfg.train.micro_batch_size * env.world_size  # one window per dp rank row
    dims = check_layout(cfg, env.world_size)
    if dims.world_size > 1:
        dims.build_meshes()
    model = build_model(cfg, env, dims, step_dir=step_dir, hf_dir=hf_dir)
    dp_rank, dp_size = dims.dp_coordinate()
    ce_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    num_bytes = torch.zeros((), dtype=torch.float64, device=env.device)
    num_tokens = 0
    for micro_batches in val_batches(
        dataset,
        global_batch_size=cfg.train.micro_batch_size * dp_size,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        max_steps=max_batches,
    ):
        num_tokens += micro_batches[0]["global_num_tokens"]
        for mb in micro_batches:
            ce_sum += micro_batch_ce_sum(
                model,
                mb,
                dims=dims,
                device=env.device,
                dtype=cfg.train.dtype,
                cp_load_balance=cfg.parallel.cp_load_balance,
            ).double()
            if byte_level:
                labels = mb["labels"]
                num_bytes += float(((labels != IGNORE_INDEX) & (labels < NUM_BYTES)).sum())
    ce_sum = parallel.sum_over_ranks(ce_sum, dims).item()
    loss = ce_sum / num_tokens
    result = {"loss": loss, "perplexity": math.exp(loss), "num_tokens": num_tokens}
    if byte_level:
        # CP ranks of one sequence count their bytes once each; dp ranks count disjoint rows
        result["num_bytes"] = int(parallel.sum_over_ranks(num_bytes, dims).item()) // dims.cp
        result["bits_per_byte"] = ce_sum / math.log(2) / result["num_bytes"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="output_dir | step_<N> dir | HF dir or cached hub id")
    parser.add_argument("--tokens", default=None, help="a token file (.bin + .json sidecar) to evaluate on")
    parser.add_argument(
        "--split", choices=("val", "train"), default="val", help="without --tokens: which split"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="windows per forward and rank")
    parser.add_argument("--max-batches", type=int, default=None, help="stop after this many global batches")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value job config overrides, e.g. parallel.ep=2")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.seq_len is not None:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.micro_batch_size is not None:
        overrides += [f"train.micro_batch_size={args.micro_batch_size}"]
    from automoe.parallel import init_distributed, shutdown_distributed
    from automoe.train.launch import _exit_before_finalization, setup_logging

    try:
        cfg, step_dir, hf_dir = job_config(args.model, overrides)
        if args.tokens is None and step_dir is None:
            raise ValueError(
                f"model={args.model!r} is a Hugging Face model: give the data with --tokens FILE"
            )
        dataset, byte_level = eval_dataset(cfg, tokens=args.tokens, split=args.split)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    env = init_distributed(timeout_s=cfg.parallel.collective_timeout_s)
    setup_logging(env.rank)
    clean = False
    try:
        result = evaluate(
            cfg,
            env,
            dataset,
            step_dir=step_dir,
            hf_dir=hf_dir,
            max_batches=args.max_batches,
            byte_level=byte_level,
        )
        clean = True
    finally:
        threads_left = shutdown_distributed(clean=clean)
    if env.is_main:
        what = args.tokens or f"the {args.split} split"
        bpb = f", {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else ""
        print(
            f"{step_dir or hf_dir} on {what}: {result['num_tokens']} tokens, loss {result['loss']:.4f} nats/token, "
            f"perplexity {result['perplexity']:.3f}{bpb}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if threads_left:
        _exit_before_finalization(threads_left)


if __name__ == "__main__":
    main()

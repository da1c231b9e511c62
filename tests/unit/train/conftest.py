"""Small single-process jobs for the training-stack unit tests (synthetic data, a 2-layer 4-expert model)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from automoe.config import JobConfig
from automoe.parallel import DistEnv

SMALL_JOB = [
    "model.vocab_size=35",
    "model.dim=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_inter_dim=64",
    "model.max_seq_len=32",
    "model.moe.moe_inter_dim=32",
    "model.moe.num_experts=4",
    "model.moe.num_activated_experts=2",
    "model.moe.num_shared_experts=1",
    "model.moe.aux_loss_coeff=0.01",
    "model.moe.gate_bias_update_factor=0.001",
    "data.source=synthetic",
    "data.seq_len=16",
    "data.synthetic_num_tokens=8000",
    "data.synthetic_vocab_size=32",
    "data.synthetic_doc_len=64",
    "data.val_fraction=0.1",
    "train.steps=6",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.val_interval=3",
    "train.val_max_batches=2",
    "optim.warmup_steps=2",
    "checkpoint.interval=0",
    "logging.progress_bar=false",
    "logging.heatmap=false",
    "logging.wandb.mode=disabled",
]


def make_job(output_dir, *overrides: str) -> JobConfig:
    """A JobConfig for a few-second CPU run: SMALL_JOB, then `overrides` (Hydra-style dotlist)."""
    dotlist = [*SMALL_JOB, f"output_dir={output_dir}", *overrides]
    cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.from_dotlist(dotlist))
    return OmegaConf.to_object(cfg)


@pytest.fixture
def env() -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

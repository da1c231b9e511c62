"""Packed documents under context parallelism (cp2, zigzag): the loader's document fields go through the
trainer's own forward/backward on 2 gloo ranks and give the single-process loss, per-document aux losses and
gradients.

The windows hold documents that cross the zigzag chunk boundaries (both ranks hold pieces of one document) and
the micro-batch has a padding row; the aux loss is the per-document `sequence` scope.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.config.parallel import ParallelConfig
from automoe.data import TokenDataset
from automoe.data.loader import PAD_ROW, make_micro_batches
from automoe.models.transformer import Transformer
from automoe.moe.layer import moe_layers
from automoe.parallel import ParallelDims, finalize_grads, parallelize, sum_over_ranks
from automoe.train.loss import forward_backward, micro_batch_ce_sum
from tests.distributed.spawn import run_distributed
from tests.tolerance import rounding_atol

SEQ, VOCAB, EOS, PAD = 16, 64, 61, 62


def _cfg() -> ModelConfig:
    moe = MoEConfig(
        num_experts=4,
        num_activated_experts=2,
        moe_inter_dim=16,
        num_shared_experts=1,
        aux_loss_coeff=0.01,
        aux_loss_type="sequence",
        z_loss_coeff=0.001,
    )
    return ModelConfig(
        vocab_size=VOCAB,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_inter_dim=48,
        num_dense_layers=1,
        max_seq_len=SEQ,
        moe=moe,
    )


def _micro_batch() -> dict:
    """Two windows of a stream whose documents (5, 9, 3, 12, 4 tokens; 3 per window) cross the 4-token zigzag
    chunks, plus a padding row: the loader's own micro-batch (document ids, restarting positions, count)."""
    g = torch.Generator().manual_seed(0)
    stream = []
    for n in (5, 9, 3, 12, 4):
        stream += torch.randint(0, EOS, (n - 1,), generator=g).tolist() + [EOS]
    data = TokenDataset(
        np.array(stream), seq_len=SEQ, vocab_size=VOCAB, eos_id=EOS, pad_id=PAD, document_masking=True
    )
    (mb,) = make_micro_batches(data, np.array([0, PAD_ROW, 1]), micro_batch_size=3, dp_rank=0, dp_size=1)
    assert mb["num_documents"] == 3
    return mb


def _build(cfg: ModelConfig, dims: ParallelDims, pcfg: ParallelConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, dims, pcfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def _step(model, dims, mb) -> tuple[float, list[float], dict]:
    cpu = torch.device("cpu")
    ce_sum, _ = forward_backward(
        model,
        [mb],
        dims=dims,
        device=cpu,
        ce_sum_fn=lambda m: micro_batch_ce_sum(model, m, dims=dims, device=cpu),
    )
    finalize_grads(model, dims)
    aux = [layer.loss_values["aux_loss"].item() for _, layer in moe_layers(model)]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum_over_ranks(ce_sum, dims).item() / mb["global_num_tokens"], aux, grads


def _worker(rank: int, world: int) -> bool:
    cfg = _cfg()
    pcfg = ParallelConfig(ep=1, cp=2, fsdp=False, cp_load_balance=True)
    dims = ParallelDims(world_size=world, cp=2, ep=1, num_experts=cfg.moe.num_experts)
    dims.build_meshes()
    model, reference = _build(cfg, dims, pcfg), _build(cfg, ParallelDims(world_size=1), ParallelConfig())
    got = _step(model, dims, _micro_batch())
    want = _step(reference, ParallelDims(world_size=1), _micro_batch())
    # the same math on half the rows per GEMM and two partial sums per statistic: one training step's rounding
    terms = max(cfg.dim, cfg.ffn_inter_dim, VOCAB, 3 * SEQ)
    tol = rounding_atol(torch.float32, terms=terms, depth=2 * (4 * cfg.num_layers + 2) + 1, scale=1.0)
    assert abs(got[0] - want[0]) <= tol * abs(want[0]), f"loss {got[0]} vs {want[0]}"
    for layer, (g, w) in enumerate(zip(got[1], want[1])):
        assert abs(g - w) <= tol * abs(w), f"layer {layer} per-document aux loss {g} vs {w}"
    assert got[2].keys() == want[2].keys()
    for name, g in got[2].items():
        w = want[2][name]
        err = ((g - w).norm() / w.norm().clamp_min(1e-12)).item()
        assert err <= tol, f"grad {name}: relative error {err}"
    return True


@pytest.mark.distributed
def test_cp2_zigzag_packed_documents_match_single_process():
    assert all(run_distributed(_worker, 2))

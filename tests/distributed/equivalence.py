"""What the layout-vs-one-process equivalence tests share: the global batch of a step, its micro-batch dicts as the
loader makes them, one training step as the trainer takes it, full tensors out of DTensors, and the per-step
comparison of loss, aux loss and grad norm."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from automoe.moe.balance import update_gate_biases
from automoe.parallel import clip_grad_norm_, finalize_grads, sum_over_ranks, sum_over_stage
from automoe.train.loss import forward_backward, micro_batch_ce_sum, pipeline_forward_backward


def global_batch(step: int, num_seqs: int, *, seq: int, vocab: int) -> torch.Tensor:
    """Step `step`'s [num_seqs, seq + 1] token ids, the same on every rank and in the reference."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (num_seqs, seq + 1), generator=g)


def micro_batches(tokens: torch.Tensor, rows: slice, num_tokens: int, *, micro: int) -> list[dict]:
    """The loader's micro-batch dicts for `rows` of the global batch (`num_tokens` labels in all)."""
    mine = tokens[rows]
    return [
        {
            "input_ids": mine[i : i + micro, :-1],
            "labels": mine[i : i + micro, 1:],
            "global_num_tokens": num_tokens,
        }
        for i in range(0, len(mine), micro)
    ]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: per-tensor relative error (robust to Adam's sign-like updates of tiny gradients)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_step_matches(got: tuple, want: tuple, rel_tol: float, what: str) -> None:
    """(loss, aux loss, grad norm) of a step against the reference's, relative: each is a sum of non-negative
    terms, so |reference| is its magnitude."""
    for name, g, w in zip(("loss", "aux", "grad_norm"), got, want):
        assert abs(g - w) <= rel_tol * abs(w), f"{what} {name}: {g} vs {w}"


def train_step(model, opt, dims, micro_batches, pipeline=None) -> tuple[float, float, float]:
    """One step as `Trainer.train_step` takes it; -> (global loss, aux loss, grad norm) as the trainer logs them."""
    cpu = torch.device("cpu")
    if pipeline is not None:
        ce_total, aux_total = pipeline_forward_backward(pipeline, micro_batches, dims=dims, device=cpu)
    else:
        ce_total, aux_total = forward_backward(
            model,
            micro_batches,
            dims=dims,
            device=cpu,
            ce_sum_fn=lambda mb: micro_batch_ce_sum(model, mb, dims=dims, device=cpu),
        )
    finalize_grads(model, dims)
    norm = clip_grad_norm_(model, 0.5, dims=dims)
    opt.step()
    update_gate_biases(model, sum_fn=lambda t: sum_over_stage(t, dims))
    opt.zero_grad(set_to_none=True)
    ce = sum_over_ranks(ce_total, dims).item() / micro_batches[0]["global_num_tokens"]
    aux = sum_over_ranks(aux_total, dims).item() / (len(micro_batches) * dims.stage_size)
    return ce, aux, norm.item()

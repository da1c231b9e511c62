"""The training objective of one step: cross-entropy over the valid tokens plus the MoE aux losses, assembled per
micro-batch so that the gradients on any layout equal those of one process on the whole global batch.

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automoe import parallel
from automoe.data import IGNORE_INDEX
from automoe.models.mtp import mtp_ce_sum
from automoe.moe import StepTotals, collect_aux_loss, set_step_totals, uses_step_totals
from automoe.moe.losses import micro_batch_counts


def padding_rows_mask(labels_BS: Tensor) -> Tensor | None:
    """[B, S] bool, True on the loader's padding rows (every label IGNORE_INDEX); None when there are none.

    Passed to the model as `padding_mask_BS`, so padding is not routed and counts in no MoE statistic, loss or
    bias update. None keeps the unmasked attention fast path. NOTE: `.any()` syncs if labels are on a device
    (the loader yields host tensors).
    """
    pad_B = (labels_BS == IGNORE_INDEX).all(dim=1)
    return pad_B[:, None].expand_as(labels_BS) if bool(pad_B.any()) else None


def autocast(device: torch.device, dtype: str):
    """bf16 autocast for `train.dtype=bfloat16`, nothing for float32."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_batch_ce_sum(
    model: nn.Module,
    mb: dict[str, Any],
    *,
    dims: parallel.ParallelDims,
    device: torch.device,
    dtype: str = "float32",
    cp_load_balance: bool = True,
) -> Tensor:
    """Forward one micro-batch (`input_ids`, `labels` [B, S]; packed documents: `document_ids` [B, S],
    `num_documents`); -> its cross-entropy summed over this rank's (CP-local) labels != IGNORE_INDEX, in
    fp32. With `model.mtp_layers = D > 0` it adds mtp_loss_coeff / D * the D multi-token-prediction CE sums
    (`automoe.models.mtp`), so the step's loss is the DeepSeek-V3 objective."""
    mtp_layers = getattr(getattr(model, "cfg", None), "mtp_layers", 0)
    if mtp_layers and dims.cp > 1:
        raise ValueError(
            f"model.mtp_layers={mtp_layers} needs parallel.cp=1 (MTP shifts tokens across CP chunks)"
        )
    mb = parallel.cp_shard_batch(mb, dims, load_balance=cp_load_balance)
    padding_mask_BS = padding_rows_mask(mb["labels"])
    document_ids_BS = mb.get("document_ids")
    with autocast(device, dtype):
        logits_BSV = model(
            mb["input_ids"].to(device),
            positions_BS=mb["positions"].to(device),
            padding_mask_BS=None if padding_mask_BS is None else padding_mask_BS.to(device),
            document_ids_BS=None if document_ids_BS is None else document_ids_BS.to(device),
            num_documents=mb.get("num_documents"),
            **({"mtp": True} if mtp_layers else {}),
        )
    logits_BSV, mtp_logits = logits_BSV if mtp_layers else (logits_BSV, None)
    labels_BS = mb["labels"].to(device)
    ce = F.cross_entropy(
        logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if mtp_logits:
        mtp_sum = mtp_ce_sum(mtp_logits, labels_BS, ignore_index=IGNORE_INDEX)
        ce = ce + model.cfg.mtp_loss_coeff / mtp_layers * mtp_sum
    return ce


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, Any]],
    *,
    dims: parallel.ParallelDims,
    device: torch.device,
    ce_sum_fn: Callable[[dict[str, Any]], Tensor],
) -> tuple[Tensor, Tensor]:
    """Accumulate the gradients of one step; -> (CE sum, aux-loss sum) of this rank (fp32 scalars).

    `ce_sum_fn(mb)` runs the forward of a micro-batch (normally `micro_batch_ce_sum`). Each micro-batch's loss is
    its share of the global objective: CE summed over this rank's labels / the global batch's token count
    (`mb["global_num_tokens"]`), plus its aux loss / (micro-batches x ranks); `loss_scale` undoes the averaging
    of the gradient reductions, so gradients equal those of one process on the whole batch. The MoE layers
    normalize their loss terms by the whole step's counts (`step_totals`), so that mean over micro-batches and
    ranks is each aux-loss scope's (and the z-loss's) definition on the step however unevenly padding falls.
    """
    scale = parallel.loss_scale(dims)
    share = 1.0 / (len(micro_batches) * dims.stage_size)
    ce_total = torch.zeros((), device=device)
    aux_total = torch.zeros((), device=device)
    if uses_step_totals(model):  # uneven micro-batches: the MoE losses are means over the whole step
        set_step_totals(model, step_totals(micro_batches, dims=dims, device=device))
    try:
        for mb in micro_batches:
            ce_sum = ce_sum_fn(mb)
            loss = ce_sum / mb["global_num_tokens"]
            aux = collect_aux_loss(model)
            if aux is not None:
                loss = loss + aux * share
                aux_total += aux.detach().float()
            (loss * scale).backward()
            ce_total += ce_sum.detach() / dims.tp  # each tp rank has the same whole-sequence CE
    finally:
        set_step_totals(model, None)
    return ce_total, aux_total


def step_totals(
    micro_batches: list[dict[str, Any]], *, dims: parallel.ParallelDims, device: torch.device
) -> StepTotals:
    """Micro-batches, sequences and valid tokens of the whole step, as the MoE layers see them (padding rows
    left out; packed: sequences are documents), summed over the data ranks in one all-reduce."""
    local = torch.zeros(3, dtype=torch.int64)
    for mb in micro_batches:
        padding_BS = padding_rows_mask(mb["labels"])
        valid_BS = torch.ones_like(mb["labels"], dtype=torch.bool) if padding_BS is None else ~padding_BS
        local += torch.tensor(micro_batch_counts(valid_BS, mb.get("document_ids")))
    # context- and tensor-parallel ranks hold the same (unsharded) micro-batches: count them once
    total = (parallel.sum_over_stage(local.to(device), dims) // (dims.cp * dims.tp)).tolist()
    return StepTotals(len(micro_batches) * dims.data_parallel, *total)


def pipeline_inputs(
    micro_batches: list[dict[str, Any]], *, dims: parallel.ParallelDims, cp_load_balance: bool = True
) -> dict[str, Any]:
    """A step's micro-batches (this rank's CP chunk of each) concatenated along the batch dim, as the pipeline
    schedule takes them (it cuts them back into the same micro-batches): `input_ids`, `labels` and the model's
    keyword tensors. A padding mask is passed when any micro-batch has padding rows (all False in the others)."""
    mbs = [parallel.cp_shard_batch(mb, dims, load_balance=cp_load_balance) for mb in micro_batches]
    pads = [padding_rows_mask(mb["labels"]) for mb in mbs]
    inputs: dict[str, Any] = {
        "input_ids": torch.cat([mb["input_ids"] for mb in mbs]),
        "labels": torch.cat([mb["labels"] for mb in mbs]),
        "positions_BS": torch.cat([mb["positions"] for mb in mbs]),
    }
    if any(p is not None for p in pads):
        inputs["padding_mask_BS"] = torch.cat(
            [torch.zeros_like(mb["labels"], dtype=torch.bool) if p is None else p for mb, p in zip(mbs, pads)]
        )
    if mbs[0].get("document_ids") is not None:
        inputs["document_ids_BS"] = torch.cat([mb["document_ids"] for mb in mbs])
        counts = [mb["num_documents"] for mb in mbs if mb.get("num_documents") is not None]
        if counts:  # one count for every micro-batch: the largest (a count only sizes per-document sums)
            inputs["num_documents"] = max(counts)
    return inputs


def pipeline_forward_backward(
    pipeline: parallel.Pipeline,
    micro_batches: list[dict[str, Any]],
    *,
    dims: parallel.ParallelDims,
    device: torch.device,
    dtype: str = "float32",
    cp_load_balance: bool = True,
) -> tuple[Tensor, Tensor]:
    """`forward_backward` under pipeline parallelism: the schedule runs the micro-batches through this rank's
    stages; each micro-batch's CE (last stage) and each stage's aux losses get the same shares of the step's
    objective as in `forward_backward`. -> (CE sum, aux-loss sum) of this rank (CE is zero off the last stage)."""
    model = pipeline.model
    if uses_step_totals(model):
        set_step_totals(model, step_totals(micro_batches, dims=dims, device=device))
    try:
        with autocast(device, dtype):
            ce_sum, aux_sum = pipeline.run(
                pipeline_inputs(micro_batches, dims=dims, cp_load_balance=cp_load_balance),
                num_tokens=micro_batches[0]["global_num_tokens"],
                train=True,
                scale=parallel.loss_scale(dims),
            )
        return ce_sum / dims.tp, aux_sum  # tp ranks compute the same whole-sequence CE: count it once
    finally:
        set_step_totals(model, None)

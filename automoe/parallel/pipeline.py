"""Pipeline parallelism: the split of the blocks into stages, `apply_pp` (each rank keeps only its stages' blocks),
and `Pipeline`, which runs a step's micro-batches through a `torch.distributed.pipelining` schedule.

Stage s of `pp * pp_virtual_stages` stages lives on pipeline rank `s % pp` (the loop placement the interleaved
schedule expects). The first stage holds the embedding, the last the final norm and the output head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from automoe.config.model import ModelConfig
from automoe.config.parallel import ParallelConfig
from automoe.moe.layer import collect_aux_loss
from automoe.parallel.dims import ParallelDims
from automoe.tensors import torch_dtype

logger = logging.getLogger(__name__)

_SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}


# ---- the split (pure; checked before any collective) ----
def balanced_split(
    costs: list[int], num_stages: int, *, first_extra: int = 0, last_extra: int = 0
) -> list[int]:
    """Blocks per stage: a contiguous split of `costs` (one per block) into `num_stages` non-empty stages that
    minimizes the largest stage cost, the first stage also paying `first_extra` (embedding) and the last
    `last_extra` (norm + head), so those stages get fewer blocks. Exact (dynamic programming, O(L^2 S))."""
    L = len(costs)
    assert 1 <= num_stages <= L, (num_stages, L)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> int:  # stage s holding blocks i..j-1
        return (
            prefix[j]
            - prefix[i]
            + (first_extra if s == 0 else 0)
            + (last_extra if s == num_stages - 1 else 0)
        )

    inf = float("inf")
    # best[s][j]: the smallest max cost of stages 0..s-1 holding blocks 0..j-1; cut[s][j] the start of stage s-1
    best = [[inf] * (L + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, L - (num_stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    sizes, j = [], L
    for s in range(num_stages, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def stage_layer_ids(model_cfg: ModelConfig, pcfg: ParallelConfig) -> list[list[str]]:
    """The block keys (`model.layers` keys) of every stage, in order; ValueError naming the setting that does
    not fit. Reads only the configs (meta-device parameter counts), so every rank can check it before a
    collective."""
    num_stages = pcfg.pp * pcfg.pp_virtual_stages
    L = model_cfg.num_layers
    if num_stages > L:
        raise ValueError(
            f"parallel.pp * parallel.pp_virtual_stages = {pcfg.pp}*{pcfg.pp_virtual_stages} = {num_stages} "
            f"stages but model.num_layers={L}: every stage needs at least one block"
        )
    sizes = pcfg.pp_layers_per_stage
    if sizes is not None:
        sizes = list(sizes)
        if len(sizes) != num_stages or sum(sizes) != L or min(sizes) < 1:
            raise ValueError(
                f"parallel.pp_layers_per_stage={sizes} must list {num_stages} stages (pp * pp_virtual_stages) of "
                f">= 1 block each, summing to model.num_layers={L}"
            )
    else:
        from automoe.models.transformer import Block  # deferred: models import nothing from parallel

        with torch.device("meta"):
            costs = [sum(p.numel() for p in Block(i, model_cfg).parameters()) for i in range(L)]
        embed = model_cfg.vocab_size * model_cfg.dim
        sizes = balanced_split(costs, num_stages, first_extra=embed, last_extra=embed + model_cfg.dim)
    ids, start = [], 0
    for n in sizes:
        ids.append([str(i) for i in range(start, start + n)])
        start += n
    return ids


def check_pipeline(model_cfg: ModelConfig, pcfg: ParallelConfig, *, num_micro_batches: int) -> None:
    """The pipeline settings against the model and the step's micro-batches per data rank (ValueError)."""
    if pcfg.pp == 1:
        if pcfg.pp_virtual_stages > 1 or pcfg.pp_layers_per_stage is not None:
            logger.warning(
                "parallel.pp_virtual_stages / pp_layers_per_stage have no effect with parallel.pp=1"
            )
        return
    stage_layer_ids(model_cfg, pcfg)
    if model_cfg.tie_embeddings:
        raise ValueError(
            f"model.tie_embeddings=true with parallel.pp={pcfg.pp}: the embedding (first stage) and the output "
            "head (last stage) live on different ranks and cannot share one parameter"
        )
    if pcfg.fsdp and pcfg.pp_virtual_stages > 1:
        raise ValueError(
            f"parallel.fsdp=true with parallel.pp_virtual_stages={pcfg.pp_virtual_stages} is not supported yet: "
            "set parallel.fsdp=false (each stage then all-reduces its gradients over its data ranks) or "
            "pp_virtual_stages=1"
        )
    if pcfg.compile:
        raise ValueError(f"parallel.compile=true with parallel.pp={pcfg.pp} is not supported")
    if model_cfg.mtp_layers:
        raise ValueError(
            f"model.mtp_layers={model_cfg.mtp_layers} with parallel.pp={pcfg.pp} is not supported (the MTP "
            "modules read the embedding of the first stage and the head of the last)"
        )
    if num_micro_batches < pcfg.pp:
        raise ValueError(
            f"{num_micro_batches} micro-batches per step (train.global_batch_size / (micro_batch_size x "
            f"data-parallel ranks)) is fewer than parallel.pp={pcfg.pp} stages: parallel.pp_schedule="
            f"{pcfg.pp_schedule} needs at least one micro-batch per stage; raise train.global_batch_size or "
            "lower train.micro_batch_size"
        )
    if pcfg.pp_schedule == "Interleaved1F1B":
        rounds = max(1, num_micro_batches // pcfg.pp)
        if num_micro_batches % rounds:
            raise ValueError(
                f"parallel.pp_schedule=Interleaved1F1B needs the {num_micro_batches} micro-batches per step to be "
                f"a multiple of {rounds} rounds (micro-batches // parallel.pp={pcfg.pp})"
            )


def is_pipeline_stage(model: nn.Module) -> bool:
    """Whether `model` is one rank's part of a pipeline (`apply_pp` removed blocks, the embedding or the head)."""
    cfg = getattr(model, "cfg", None)
    layers = getattr(model, "layers", None)
    if cfg is None or layers is None:
        return False
    return len(layers) < cfg.num_layers or model.tok_embeddings is None or model.output is None


def local_stage_indices(dims: ParallelDims, pcfg: ParallelConfig) -> list[int]:
    """The stages this rank runs: pipeline rank r holds stages r, r + pp, r + 2 pp, ..."""
    pp_rank, pp = dims.pp_coordinate()
    return [pp_rank + v * pp for v in range(pcfg.pp_virtual_stages)]


def apply_pp(model: nn.Module, dims: ParallelDims, pcfg: ParallelConfig) -> None:
    """Keep only this rank's stages' blocks (keys unchanged, so parameter names match the whole model's) and the
    embedding / norm + head only where the first / last stage runs; the others become None.

    `Transformer.init_weights` still draws the values of the dropped pieces from the RNG, so every stage
    initializes to its part of the one-process model.
    """
    stages = stage_layer_ids(model.cfg, pcfg)
    mine = local_stage_indices(dims, pcfg)
    keep = {key for s in mine for key in stages[s]}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if 0 not in mine:
        model.tok_embeddings = None
    if len(stages) - 1 not in mine:
        model.norm, model.output = None, None
    logger.info(
        "applied pipeline parallelism: pp=%d, stages %s of %d on this rank, blocks %s",
        dims.pp,
        mine,
        len(stages),
        [stages[s] for s in mine],
    )


def gather_over_stages(record: dict[str, Any], dims: ParallelDims) -> dict[str, Any]:
    """Every stage's `record` (per-layer metrics keyed by layer name) merged in stage order, on every rank of the
    pipeline group (a small object all-gather; layer names are unique across stages)."""
    gathered: list[dict[str, Any] | None] = [None] * dims.pp
    dist.all_gather_object(gathered, record, group=dims.pp_mesh.get_group())
    merged: dict[str, Any] = {}
    for part in gathered:
        merged.update(part or {})
    return dict(sorted(merged.items(), key=lambda kv: _layer_index(kv[0])))


def _layer_index(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), name) if len(parts) > 1 and parts[1].isdigit() else (-1, name)


# ---- running a step ----
class _AuxLossGrad(torch.autograd.Function):
    """Identity on a stage's output whose backward also gives the stage's aux loss the gradient `scale`: the aux
    losses of a stage's MoE layers join the objective on their own stage, per micro-batch, under any schedule."""

    @staticmethod
    def forward(ctx, out: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: its blocks (shared with the rank's model, so parameter names and
    optimizer state stay the model's), plus the embedding on the first stage and the norm + head on the last.

    `forward(x, *, positions_BS, padding_mask_BS=None, document_ids_BS=None, num_documents=None)`: x is
    tokens_BS on the first stage, else the previous stage's h_BSD; -> logits_BSV on the last stage, else h_BSD.
    The same computation as `Transformer.forward` restricted to the stage's pieces.
    """

    def __init__(self, model: nn.Module, keys: list[str], *, first: bool, last: bool) -> None:
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        self.rope = model.rope
        self.layers = nn.ModuleDict({k: model.layers[k] for k in keys})
        self.norm, self.output = (model.norm, model.output) if last else (None, None)

    def forward(
        self,
        x: Tensor,
        *,
        positions_BS: Tensor,
        padding_mask_BS: Tensor | None = None,
        document_ids_BS: Tensor | None = None,
        num_documents: int | None = None,
    ) -> Tensor:
        if document_ids_BS is not None and num_documents is None:
            num_documents = int(document_ids_BS.max()) + 1  # NOTE: host sync (as in Transformer.forward)
        h_BSD = x if self.tok_embeddings is None else self.tok_embeddings(x)
        cos_BSA, sin_BSA = self.rope(positions_BS)
        for block in self.layers.values():
            h_BSD = block(
                h_BSD,
                cos_BSA,
                sin_BSA,
                positions_BS=positions_BS,
                padding_mask_BS=padding_mask_BS,
                document_ids_BS=document_ids_BS,
                num_documents=num_documents,
            )
        return h_BSD if self.output is None else self.output(self.norm(h_BSD))


def init_stage_weights(model: nn.Module) -> None:
    """`init_weights()` for a model `apply_pp` pruned: the whole model's initializer runs on a meta-device copy
    into which this rank's pieces are put back, so the RNG draws every tensor in the one-process order and each
    stage gets exactly its part of the one-process model (meta tensors take no writes)."""
    with torch.device("meta"):
        whole = type(model)(model.cfg)
    whole.rope = model.rope
    for key, block in model.layers.items():
        whole.layers[key] = block
    for name in ("tok_embeddings", "norm", "output"):
        if getattr(model, name) is not None:
            setattr(whole, name, getattr(model, name))
    whole.init_weights()


@dataclass
class _StepState:
    """What the loss function and the aux hooks need during one `schedule.step` (reset per step)."""

    num_tokens: int = 1  # the global batch's label count (the CE normalizer)
    scale: float = 1.0  # `loss_scale`: undoes the gradient averaging over the stage's ranks
    aux_scale: float = 0.0  # gradient of each micro-batch's aux loss (its share of the step x `scale`)
    ce_sums: list | None = None
    aux_sums: list | None = None


class Pipeline:
    """This rank's pipeline stages and the schedule over them; `forward_backward` runs one step's micro-batches.

    `model` is the pruned model `apply_pp` left (its parameters are what the optimizer and checkpoints see).
    """

    def __init__(
        self,
        model: nn.Module,
        dims: ParallelDims,
        pcfg: ParallelConfig,
        *,
        num_micro_batches: int,
        micro_batch_shape: tuple[int, int],
        device: torch.device,
    ) -> None:
        self.model, self.dims, self.device = model, dims, device
        self.num_micro_batches = num_micro_batches
        stages = stage_layer_ids(model.cfg, pcfg)
        mine = local_stage_indices(dims, pcfg)
        self.state = _StepState()
        self.chunks: list[nn.Module] = []
        self.stages: list[PipelineStage] = []
        for s in mine:
            first, last = s == 0, s == len(stages) - 1
            chunk = StageModule(model, stages[s], first=first, last=last)
            chunk.register_forward_hook(self._attach_aux_loss)
            self.chunks.append(chunk)
            # static shapes (meta tensors): the schedule's dynamic shape inference would run a stage's forward on
            # uninitialized data, counting its routing in the step's expert loads
            inputs, outputs = self._example_args(
                model.cfg, micro_batch_shape, first=first, last=last, seq_shards=dims.tp
            )
            self.stages.append(
                PipelineStage(
                    chunk,
                    s,
                    len(stages),
                    device,
                    input_args=inputs,
                    output_args=outputs,
                    group=dims.pp_mesh.get_group(),
                )
            )
        self.has_last = any(st.is_last for st in self.stages)
        schedule_cls = _SCHEDULES[pcfg.pp_schedule]
        self.schedule = schedule_cls(
            self.stages if pcfg.pp_schedule == "Interleaved1F1B" else self.stages[0],
            n_microbatches=num_micro_batches,
            loss_fn=self._loss,
            scale_grads=False,  # each micro-batch's loss is already its share of the step's objective
        )
        self.schedule_name = pcfg.pp_schedule

    @staticmethod
    def _example_args(
        cfg, shape: tuple[int, int], *, first: bool, last: bool, seq_shards: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Meta tensors shaped like one micro-batch's stage input and output ([B, S] tokens on the first stage,
        else [B, S / seq_shards, D] hidden states (tensor parallelism: this rank's sequence slice); [B, S, V]
        logits from the last)."""
        dtype = torch_dtype(cfg.dtype)
        B, S = shape
        hidden = torch.empty(B, S // seq_shards, cfg.dim, dtype=dtype, device="meta", requires_grad=True)
        tokens = torch.empty(*shape, dtype=torch.int64, device="meta")
        logits = torch.empty(*shape, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
        return (tokens if first else hidden), (logits if last else hidden)

    def _attach_aux_loss(self, chunk: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        if not (chunk.training and torch.is_grad_enabled() and self.state.aux_sums is not None):
            return None
        aux = collect_aux_loss(chunk)
        if aux is None:
            return None
        self.state.aux_sums.append(aux.detach().float())
        return _AuxLossGrad.apply(out, aux, self.state.aux_scale)

    def _loss(self, logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
        from automoe.data import IGNORE_INDEX

        ce_sum = torch.nn.functional.cross_entropy(
            logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if self.state.ce_sums is not None:
            self.state.ce_sums.append(ce_sum.detach())
        return ce_sum / self.state.num_tokens * self.state.scale

    def run(
        self, inputs: dict[str, Any], *, num_tokens: int, train: bool, scale: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """One pass of the schedule over `inputs` (the step's micro-batches concatenated along the batch dim:
        `input_ids`, `labels` [n*B, S] and the model's keyword tensors) -> (CE sum, aux-loss sum) on this rank
        (zero CE off the last stage). `train`: forward and backward, each micro-batch's loss being its share of the
        step's objective times `scale`; otherwise forward only."""
        share = 1.0 / (self.num_micro_batches * self.dims.stage_size)
        self.state = _StepState(num_tokens, scale, share * scale, ce_sums=[], aux_sums=[])
        kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels")}
        target = inputs["labels"].to(self.device)
        try:
            if train:
                self.schedule.step(
                    inputs["input_ids"].to(self.device), target=target, return_outputs=False, **kwargs
                )
            else:
                self.schedule.eval(inputs["input_ids"].to(self.device), target=target, **kwargs)
            ce = (
                torch.stack(self.state.ce_sums).sum()
                if self.state.ce_sums
                else torch.zeros((), device=self.device)
            )
            aux = (
                torch.stack(self.state.aux_sums).sum()
                if self.state.aux_sums
                else torch.zeros((), device=self.device)
            )
        finally:
            self.state = _StepState()
        return ce, aux

"""The MoE layer: gate -> dispatch -> experts -> combine (+ shared experts), with balancing statistics.

Shape suffixes: docs/architecture.md#shape-legend.
The layer knows nothing of process groups: the token dispatcher and the statistics reducer are seams that
`automoe.parallel` swaps for distributed versions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from automoe.config.gates import gate_spec
from automoe.config.moe import MoEConfig
from automoe.moe import losses
from automoe.moe.dispatch import LocalDispatcher
from automoe.moe.experts import GroupedExperts
from automoe.moe.gates import build_gate
from automoe.moe.index import capacity_keep_mask, count_per_expert
from automoe.moe.shared import SharedExperts
from automoe.moe.types import IdentityReducer, RouterOutput, StatsReducer, TokenDispatcher

# The bias update's per-layer training state (`moe.balance`): checkpointed buffers, not weights (no HF tensor)
BIAS_UPDATE_STATE = ("bias_step_exponent", "bias_last_sign", "bias_velocity")


def in_backward_recompute() -> bool:
    """True while the autograd engine runs a backward pass, i.e. during activation-checkpoint recomputation."""
    return torch._C._current_graph_task_id() != -1


class ReplayReducer:
    """A `StatsReducer` over training forwards: `record(inner)` forwards to `inner` and keeps each result;
    `replay()` returns the oldest not yet replayed forward's results in the same order, for activation-checkpoint
    recomputation in backward.

    Backward recomputes micro-batches in the order their forwards ran, also when a pipeline schedule runs
    several forwards before their backwards, hence one recording per forward, first in first out; `clear()`
    (every optimizer step, every no-grad forward) drops the ones never replayed (no checkpointing).
    The recomputed loss terms only refill the tensors their backward saved, so the forward's reduced values
    are exact and no collective runs again; the backward of `sum_over_sequence` belongs to the forward's graph.
    """

    def __init__(self) -> None:
        self._inner: StatsReducer | None = None
        self._recordings: deque[list[tuple[Tensor, bool]]] = (
            deque()
        )  # forwards not replayed yet, oldest first
        self._results: list[tuple[Tensor, bool]] = []  # (value, requires_grad) of each reduction, in order
        self._next: int | None = None  # replay position; None while recording

    @property
    def recorded(self) -> bool:
        return bool(self._recordings)

    def clear(self) -> None:
        self._inner, self._recordings, self._results, self._next = None, deque(), [], None

    def record(self, inner: StatsReducer) -> ReplayReducer:
        self._inner, self._results, self._next = inner, [], None
        self._recordings.append(self._results)
        return self

    def replay(self) -> ReplayReducer:
        self._results, self._next = self._recordings.popleft(), 0
        return self

    def sum_over_sequence(self, t: Tensor) -> Tensor:
        return self._call("sum_over_sequence", t)

    def sum_over_batch(self, t: Tensor) -> Tensor:
        return self._call("sum_over_batch", t)

    def _call(self, name: str, t: Tensor) -> Tensor:
        if self._next is None:
            out = getattr(self._inner, name)(t)
            self._results.append((out.detach(), out.requires_grad))
            return out
        assert self._next < len(self._results), "the recomputation reduces more than its forward did"
        value, requires_grad = self._results[self._next]
        self._next += 1
        # a fresh leaf that needs grad as the forward's result did: the recompute saves the same tensors
        return value.detach().requires_grad_(requires_grad)


class MoE(nn.Module):
    """Mixture-of-Experts FFN.
    `forward(x_BSD, padding_mask_BS=None, *, document_ids_BS=None, num_documents=None) -> y_BSD`.

    `padding_mask_BS` is True at padding: those tokens are not routed, get zero routed output and never count in
    statistics or losses. `document_ids_BS` (packed documents, ids < `num_documents`) makes the `sequence` aux
    loss per document. After a training forward, `self.aux_loss` holds the weighted sum of this layer's
    balancing losses (a scalar with graph, or None) and `self.expert_load` the load accumulated this step.
    """

    def __init__(
        self, cfg: MoEConfig, *, gate: nn.Module | None = None, experts: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_activated_experts
        self.gate = gate if gate is not None else build_gate(cfg)
        self.gate_spec = gate_spec(
            cfg.gate
        )  # what the gate declares: which losses apply, whether it has a bias
        self.experts = experts if experts is not None else GroupedExperts(cfg)
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.num_experts)
        self.reducer: StatsReducer = IdentityReducer()
        # Routing statistics (not checkpointed): training load of the current optimizer step, load seen in
        # evaluation, valid tokens this step, and token-slots dropped by the capacity limit. int64, so they are
        # exact counts whatever the module's dtype: `model.to(torch.bfloat16)` casts floating buffers only (a bf16
        # counter stops counting exactly at 2^8 per expert, an fp32 one at 2^24).
        for name, shape in (
            ("expert_load", (cfg.num_experts,)),
            ("eval_expert_load", (cfg.num_experts,)),
            ("step_tokens", ()),
            ("dropped_slots", ()),
        ):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.int64), persistent=False)
        # State of `bias_update_rule=adaptive` (`moe.balance`), checkpointed: each expert's step exponent k (step
        # = gamma * 2^(k/4)) and the sign of its last update. Integers: exact on every rank, never cast by .to().
        if cfg.bias_update_rule == "adaptive":
            self.register_buffer("bias_step_exponent", torch.zeros(cfg.num_experts, dtype=torch.int64))
            self.register_buffer("bias_last_sign", torch.zeros(cfg.num_experts, dtype=torch.int64))
        # State of `bias_update_drift` > 0, checkpointed: each expert's bias velocity (fp32 like the bias, kept fp32
        # by `_apply`). Computed from the same integer loads and fp32 ops on every rank: bitwise equal everywhere.
        if cfg.bias_update_drift > 0:
            self.register_buffer("bias_velocity", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.aux_loss: Tensor | None = None
        self.loss_values: dict[str, float] = {}
        self._replay = ReplayReducer()
        # float32 [3] `losses.StepTotals.per_unit` of the training step being accumulated (`set_step_totals`);
        # None: each forward's losses are over its own micro-batch
        self.step_per_unit: Tensor | None = None

    # ---- forward ----
    def forward(
        self,
        x_BSD: Tensor,
        padding_mask_BS: Tensor | None = None,
        *,
        document_ids_BS: Tensor | None = None,
        num_documents: int | None = None,
    ) -> Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        valid_T = None if padding_mask_BS is None else ~padding_mask_BS.reshape(B * S)
        route = self.gate(x_TD, valid_T)
        valid_TK = self._routable_slots(route, valid_T)
        documents = None
        if document_ids_BS is not None:  # packed documents: the `sequence` aux loss is taken per document
            if num_documents is None:
                num_documents = int(document_ids_BS.max()) + 1  # NOTE: host sync (CP: the caller passes it)
            documents = (document_ids_BS.reshape(B * S), num_documents)
        self._record(route, valid_T, valid_TK, batch=B, documents=documents)

        x_ND, counts_E, ctx = self.dispatcher.dispatch(x_TD, route.indices_TK, route.weights_TK, valid_TK)
        y_ND = self.experts(x_ND, counts_E)
        y_TD = self.dispatcher.combine(y_ND, ctx).to(x_BSD.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, S, D)

    def _routable_slots(self, route: RouterOutput, valid_T: Tensor | None) -> Tensor | None:
        """[T, K] bool of slots to dispatch (padding removed, capacity applied); None = all of them."""
        T, K = route.indices_TK.shape
        valid_TK = None if valid_T is None else valid_T[:, None].expand(T, K)
        if self.cfg.capacity_factor is None or not self.training:
            return valid_TK
        # NOTE: host sync: the capacity is a Python int derived from the number of valid tokens.
        num_valid = T if valid_T is None else int(valid_T.sum())
        capacity = math.ceil(self.cfg.capacity_factor * num_valid * K / self.num_experts)
        return capacity_keep_mask(route.indices_TK, route.weights_TK, valid_T, self.num_experts, capacity)

    # ---- statistics and losses ----
    @torch.no_grad()
    def _count(self, route: RouterOutput, valid_T: Tensor | None, valid_TK: Tensor | None) -> Tensor:
        load_E = count_per_expert(route.indices_TK, valid_T, self.num_experts)
        if not self.training:
            self.eval_expert_load += load_E
            return load_E
        if in_backward_recompute():  # activation checkpointing replays the forward: count once
            return load_E
        self.expert_load += load_E
        self.step_tokens += route.indices_TK.shape[0] if valid_T is None else valid_T.sum()
        if valid_TK is not None:
            num_slots = route.indices_TK.numel() if valid_T is None else valid_T.sum() * self.top_k
            self.dropped_slots += num_slots - valid_TK.sum()
        return load_E

    def _record(
        self,
        route: RouterOutput,
        valid_T: Tensor | None,
        valid_TK: Tensor | None,
        *,
        batch: int,
        documents: tuple[Tensor, int] | None = None,
    ) -> None:
        self._count(route, valid_T, valid_TK)
        if not (self.training and torch.is_grad_enabled()):
            self.aux_loss, self.loss_values = None, {}
            self._replay.clear()
            return
        # Activation-checkpoint recomputation rebuilds the loss terms only for the tensors their backward saved:
        # the reduced statistics are the forward's (no collective repeats), the forward's losses are kept.
        recompute = in_backward_recompute() and self._replay.recorded
        reducer = self._replay.replay() if recompute else self._replay.record(self.reducer)
        cfg, terms, values = self.cfg, [], {}
        if cfg.aux_loss_coeff > 0 and self.gate_spec.balancing_probs and route.probs_TE is not None:
            global_load = global_tokens = None
            if cfg.aux_loss_type == "global":
                global_load = reducer.sum_over_batch(self.expert_load.clone())
                global_tokens = reducer.sum_over_batch(self.step_tokens.clone())
            document_T, num_documents = documents if documents is not None else (None, 1)
            aux = losses.aux_loss(
                route.probs_TE,
                route.indices_TK,
                valid_T,
                batch=batch,
                scope=cfg.aux_loss_type,
                reducer=reducer,
                global_load_E=global_load,
                global_tokens=global_tokens,
                document_T=document_T,
                num_documents=num_documents,
                step_per_unit=self.step_per_unit,
            )
            terms.append(cfg.aux_loss_coeff * aux)
            values["aux_loss"] = aux.detach()
        if cfg.z_loss_coeff > 0 and route.logits_TE is not None:
            z = losses.z_loss(route.logits_TE, valid_T, reducer=reducer, step_per_unit=self.step_per_unit)
            terms.append(cfg.z_loss_coeff * z)
            values["z_loss"] = z.detach()
        if route.gate_loss is not None:
            terms.append(route.gate_loss)
            values["gate_loss"] = route.gate_loss.detach()
        aux_loss = torch.stack(terms).sum() if terms else None
        if not recompute:
            self.aux_loss, self.loss_values = aux_loss, values

    def reset_statistics(self) -> None:
        """Zero the per-step training statistics (called after each optimizer step)."""
        for buf in (self.expert_load, self.step_tokens, self.dropped_slots):
            buf.zero_()
        self._replay.clear()

    # ---- initialization ----
    def init_weights(self, *, std: float = 0.02, out_std: float | None = None) -> None:
        self.gate.init_weights(std=std)
        self.experts.init_weights(std=std, out_std=out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std=std, out_std=out_std)
        for buf in (self.expert_load, self.eval_expert_load, self.step_tokens, self.dropped_slots):
            buf.zero_()
        for name in BIAS_UPDATE_STATE:
            if hasattr(self, name):
                getattr(self, name).zero_()

    def _apply(self, fn, recurse: bool = True):
        """`.to(dtype)` and the like cast floating buffers; the bias velocity is only moved, fp32 like the bias."""
        velocity = getattr(self, "bias_velocity", None)
        super()._apply(fn, recurse)
        if velocity is not None and self.bias_velocity.dtype != velocity.dtype:
            self._buffers["bias_velocity"] = velocity.to(device=self.bias_velocity.device)
        return self


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """Every MoE layer of `model` with its qualified name, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield name, module


def uses_step_totals(model: nn.Module) -> bool:
    """Whether any MoE layer has a loss term that `set_step_totals` normalizes (aux loss or z-loss)."""
    return any(m.cfg.aux_loss_coeff > 0 or m.cfg.z_loss_coeff > 0 for _, m in moe_layers(model))


def set_step_totals(model: nn.Module, totals: losses.StepTotals | None) -> None:
    """Normalize every MoE layer's loss terms by the step's `totals` from now on (None: by each micro-batch).

    Set before a step's first micro-batch and cleared after its last backward (`automoe.train.loss`)."""
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        return
    per_unit = None if totals is None else totals.per_unit(layers[0].expert_load.device)
    for layer in layers:
        layer.step_per_unit = per_unit


def collect_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the weighted balancing losses of the last training forward of every MoE layer (None if none)."""
    terms = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(terms).sum() if terms else None

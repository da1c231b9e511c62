"""Gradient accumulation over micro-batches with different numbers of valid tokens (padding rows, one micro-batch
all padding) gives, for every aux-loss scope and the z-loss, the value and gradients of the scope's definition on
the whole step, at DP 1 and DP 2 (issue 16, item 3).

Megatron's `global_aux_loss` divided the counts accumulated over the step's micro-batches by the current
micro-batch's token count; here, before `StepTotals`, `sequence`, `global` and the z-loss averaged per
micro-batch first, so a token of a half-padded micro-batch weighed twice as much as one of a full micro-batch.

The step runs through the trainer's own loss assembly (`automoe.train.loss.forward_backward`: step totals, aux
share, loss scale) and gradient finalization; the reference computes each definition from its formula on the
step's routing, written per micro-batch / per sequence / per token with explicit loops over the step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automoe.config.moe import MoEConfig
from automoe.data import IGNORE_INDEX
from automoe.moe.layer import MoE
from automoe.parallel import ParallelDims, finalize_grads
from automoe.parallel.parallelize import apply_stats_reducers
from automoe.train.loss import forward_backward, padding_rows_mask
from tests.distributed.spawn import run_distributed
from tests.tolerance import assert_close_rounding

V, D, E, K = 13, 8, 4, 2
ROWS, SEQ, MICRO = 3, 4, 3  # rows per micro-batch, tokens per row, micro-batches per DP-2 rank
AUX_COEFF, Z_COEFF = 1.0, 0.1
# padding rows of each micro-batch, [rank][micro-batch] at DP 2 (DP 1 runs the same six in order):
# full, 1 padded row, 2 padded rows | all padding, full, 1 padded row
PADDED = [[0, 1, 2], [3, 0, 1]]


class Net(nn.Module):
    """Embedding -> MoE, the routed part of a transformer block (the gate's input carries gradient)."""

    def __init__(self, scope: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        cfg = MoEConfig(
            dim=D,
            moe_inter_dim=8,
            num_experts=E,
            num_activated_experts=K,
            aux_loss_coeff=AUX_COEFF,
            aux_loss_type=scope,
            z_loss_coeff=Z_COEFF,
        )
        self.moe = MoE(cfg)
        self.moe.init_weights(std=0.5)

    def forward(self, input_ids: torch.Tensor, padding_mask_BS: torch.Tensor | None) -> torch.Tensor:
        return self.moe(self.emb(input_ids), padding_mask_BS)


def micro_batches() -> list[list[dict]]:
    """[rank][micro-batch] loader-style dicts (padding rows have every label IGNORE_INDEX)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for ranks in PADDED:
        mbs = []
        for padded in ranks:
            ids = torch.randint(0, V, (ROWS, SEQ + 1), generator=g)
            labels = ids[:, 1:].clone()
            labels[ROWS - padded :] = IGNORE_INDEX
            mbs.append({"input_ids": ids[:, :-1], "labels": labels, "global_num_tokens": 1})
        out.append(mbs)
    return out


def train_step(net: Net, mbs: list[dict], dims: ParallelDims) -> tuple[float, dict[str, torch.Tensor]]:
    """One step as the trainer takes it; -> (logged aux loss, finalized gradients). The CE is left out (x 0)."""

    def forward(mb):
        return net(mb["input_ids"], padding_rows_mask(mb["labels"])).sum() * 0.0

    _, aux_sum = forward_backward(net, mbs, dims=dims, device=torch.device("cpu"), ce_sum_fn=forward)
    finalize_grads(net, dims)
    if dims.world_size > 1:
        torch.distributed.all_reduce(aux_sum)
    aux = aux_sum.item() / (len(mbs) * dims.world_size)  # as `Trainer.train_step` logs it
    return aux, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _switch(load_E: torch.Tensor, sum_p_E: torch.Tensor, tokens: int) -> torch.Tensor:
    """sum_e f_e P_e with f_e = L_e E / (K T), P_e = sum_t p_te / T."""
    return (load_E * E / (K * tokens) * (sum_p_E / tokens)).sum()


def reference(net: Net, layout: list[list[dict]], scope: str) -> torch.Tensor:
    """The scope's definition on the whole step (every micro-batch of every rank of `layout`), with graph."""
    units = []  # (micro-batch index on its rank, probs_TE, indices_TK, logits_TE, valid_T) per micro-batch
    for mbs in layout:
        for i, mb in enumerate(mbs):
            x_TD = net.emb(mb["input_ids"]).reshape(-1, D)
            route = net.moe.gate(x_TD, None)
            valid_T = (mb["labels"] != IGNORE_INDEX).any(dim=1).repeat_interleave(SEQ)  # padding rows out
            units.append((i, route.probs_TE, route.indices_TK, route.logits_TE, valid_T))

    def stats(probs, idx, valid):
        load = torch.bincount(idx[valid].reshape(-1), minlength=E).double()
        return load, probs[valid].double().sum(0), int(valid.sum())

    step_tokens = sum(int(u[4].sum()) for u in units)
    z = sum((torch.logsumexp(lg[v].double(), -1) ** 2).sum() for _, _, _, lg, v in units) / step_tokens
    if scope == "micro_batch":
        per_unit = [_switch(*stats(p, ix, v)) for _, p, ix, _, v in units if v.any()]
        aux = sum(per_unit) / len(per_unit)
    elif scope == "sequence":
        per_seq = []
        for _, p, ix, _, v in units:
            for r in range(ROWS):
                rows = slice(r * SEQ, (r + 1) * SEQ)
                if v[rows].any():
                    per_seq.append(_switch(*stats(p[rows], ix[rows], v[rows])))
        aux = sum(per_seq) / len(per_seq)
    else:  # global: f from the load of micro-batches 1..i of every rank, P over the step's tokens
        aux = 0.0
        for i, p, _, _, v in units:
            prefix = [stats(q, jx, w) for j, q, jx, _, w in units if j <= i]
            load = sum(s[0] for s in prefix)
            tokens = sum(s[2] for s in prefix)
            aux = aux + (load * E / (K * tokens) * p[v].double().sum(0)).sum() / step_tokens
    return AUX_COEFF * aux + Z_COEFF * z


def _routed(net: Net) -> list[tuple[str, nn.Parameter]]:
    """The parameters the losses reach: the router and the embedding under it."""
    params = [(n, p) for n, p in net.named_parameters() if p.grad is not None]
    assert {n for n, _ in params} == {"emb.weight", "moe.gate.weight"}
    return params


def check(scope: str, got_aux: float, got_grads: dict[str, torch.Tensor]) -> None:
    net = Net(scope)
    ref = reference(net, micro_batches(), scope)
    ref.backward()
    tokens = sum(ROWS * SEQ for _ in range(2 * MICRO))
    # fp32 sums over at most the step's 72 tokens, in other orders (per micro-batch, then over micro-batches and
    # ranks) than the float64 reference: a mean over tokens, over micro-batches/sequences, a sum over E, + z-loss
    assert_close_rounding(torch.tensor(got_aux), ref.detach().float(), terms=tokens, depth=4, msg=scope)
    for name, p in _routed(net):
        # backward: the same sums again, then the router's D-term contraction and the embedding's accumulation
        assert_close_rounding(got_grads[name], p.grad.float(), terms=tokens, depth=8, msg=f"{scope} {name}")


def _dp2_worker(rank: int, world: int) -> dict[str, tuple[float, dict]]:
    torch.set_num_threads(1)
    dims = ParallelDims(world_size=world)
    dims.build_meshes()
    results = {}
    for scope in SCOPES:
        net = Net(scope)
        apply_stats_reducers(net, dims)
        results[scope] = train_step(net, micro_batches()[rank], dims)
    return results


SCOPES = ["micro_batch", "sequence", "global"]


@pytest.mark.parametrize("scope", SCOPES)
def test_dp1_accumulation_over_uneven_micro_batches_gives_the_whole_step_definition(scope):
    layout = micro_batches()
    got_aux, got_grads = train_step(Net(scope), layout[0] + layout[1], ParallelDims(world_size=1))
    # DP 1 runs the six micro-batches in a row: the `global` prefix is over that order
    net = Net(scope)
    ref = reference(net, [layout[0] + layout[1]], scope)
    ref.backward()
    tokens = 2 * MICRO * ROWS * SEQ
    assert_close_rounding(torch.tensor(got_aux), ref.detach().float(), terms=tokens, depth=4, msg=scope)
    for name, p in _routed(net):
        assert_close_rounding(got_grads[name], p.grad.float(), terms=tokens, depth=8, msg=f"{scope} {name}")


@pytest.mark.distributed
def test_dp2_accumulation_over_uneven_micro_batches_gives_the_whole_step_definition():
    results = run_distributed(_dp2_worker, 2)
    for scope in SCOPES:
        (aux0, grads0), (aux1, grads1) = results[0][scope], results[1][scope]
        assert aux0 == aux1  # every rank logs the same all-reduced value
        assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)  # finalized gradients agree
        check(scope, aux0, grads0)

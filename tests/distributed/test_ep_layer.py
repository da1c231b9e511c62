"""The MoE layer under expert parallelism equals the single-process layer on the same tokens.

Each rank holds a different slice of a global batch (uneven sizes, zero-token ranks, padding); the objective is
the sum of per-rank losses, so the reference is the single-process layer run on every slice in turn.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from automoe.config.moe import MoEConfig
from automoe.moe.layer import MoE
from automoe.parallel.dims import EP, EP_SHARD
from automoe.parallel.expert_parallel import apply_ep
from tests.distributed.spawn import run_distributed
from tests.tolerance import assert_close_rounding, assert_equal

CASES = {
    "softmax-top2": (
        MoEConfig(
            dim=16,
            moe_inter_dim=24,
            num_experts=8,
            num_activated_experts=2,
            aux_loss_coeff=0.01,
            z_loss_coeff=0.001,
        ),
        [3, 1, 2, 2],
    ),
    "dedup-top4-shared-padding": (
        MoEConfig(
            dim=16,
            moe_inter_dim=24,
            num_experts=8,
            num_activated_experts=4,
            num_shared_experts=1,
            norm_topk_prob=True,
            aux_loss_coeff=0.01,
            aux_loss_type="sequence",
        ),
        [2, 2, 1, 3],
    ),
    "zero-token-rank": (
        MoEConfig(dim=16, moe_inter_dim=24, num_experts=4, num_activated_experts=2, experts_backend="loop"),
        [2, 0, 1, 1],
    ),
    # every token routes to experts 0..1 (rank 0): the other ranks' experts receive nothing
    "idle-experts": (
        MoEConfig(
            dim=16,
            moe_inter_dim=24,
            num_experts=8,
            num_activated_experts=2,
            score_func="sigmoid",
            correction_bias=True,
        ),
        [2, 1, 1, 2],
    ),
}
SEQ = 5


def _make(cfg: MoEConfig, case: str) -> MoE:
    torch.manual_seed(0)
    layer = MoE(cfg)
    layer.init_weights(std=0.2)
    if case == "idle-experts":
        layer.gate.correction_bias[:2] = 100.0
    return layer


def _inputs(sizes: list[int], cfg: MoEConfig, case: str):
    g = torch.Generator().manual_seed(1)
    xs, masks, targets = [], [], []
    for b in sizes:
        xs.append(torch.randn(b, SEQ, cfg.dim, generator=g))
        mask = torch.zeros(b, SEQ, dtype=torch.bool)
        if "padding" in case and b:
            mask[0, -2:] = True
        masks.append(mask)
        targets.append(torch.randn(b, SEQ, cfg.dim, generator=g))
    return xs, masks, targets


def _loss(layer: MoE, x, mask, target):
    y = layer(x, mask)
    loss = (y * target).sum()
    if layer.aux_loss is not None:
        loss = loss + layer.aux_loss
    return y, loss


def _grads(layer: MoE) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in layer.named_parameters():
        g = p.grad
        out[name] = g.to_local() if hasattr(g, "to_local") else g
    return out


def _ep_worker(rank: int, world: int, ep: int) -> dict:
    return {case: _check_case(rank, world, case, ep) for case in CASES}


def _check_case(rank: int, world: int, case: str, ep: int) -> dict:
    cfg, sizes = CASES[case]
    sizes = sizes[:world]
    reference = _make(cfg, case)
    layer = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=(EP_SHARD, EP))
    apply_ep(layer, mesh[EP])
    xs, masks, targets = _inputs(sizes, cfg, case)

    y, loss = _loss(layer, xs[rank], masks[rank], targets[rank])
    loss.backward()
    grads = _grads(layer)
    for name, g in grads.items():  # replicated params: sum the per-rank contributions
        if not name.startswith("experts."):
            dist.all_reduce(g)
        elif ep < world:  # expert shards are replicated over ep_shard: sum over it
            dist.all_reduce(g, group=mesh[EP_SHARD].get_group())

    ref_loss = 0.0
    for r in range(world):
        ref_y, ref_l = _loss(reference, xs[r], masks[r], targets[r])
        ref_l.backward()
        ref_loss += ref_l.item()
        if r == rank:
            ref_y_mine, ref_loss_mine = ref_y.detach(), ref_l.item()
    ref_grads = _grads(reference)
    local = layer.experts.w_up.to_local().shape[0]
    lo = (rank % ep) * local
    for name in ref_grads:
        if name.startswith("experts."):
            ref_grads[name] = ref_grads[name][lo : lo + local]
    # Outputs: two chained contractions (D, then F) plus the K-way combine, in another order than the reference.
    assert_close_rounding(y.detach(), ref_y_mine, terms=max(cfg.dim, cfg.moe_inter_dim), depth=3)
    # The loss sums this rank's y * target terms, each carrying the outputs' error: bound by their absolute sum.
    assert_close_rounding(
        loss.detach(),
        torch.tensor(ref_loss_mine),
        terms=y.numel(),
        depth=4,
        scale=(y.detach() * targets[rank]).abs().sum(),
    )
    # Gradients: backward through the same chain, then a sum over every routed slot of the global batch.
    num_slots = sum(sizes) * SEQ * cfg.num_activated_experts
    for name, g in grads.items():
        assert_close_rounding(
            g, ref_grads[name], terms=num_slots + max(cfg.dim, cfg.moe_inter_dim), depth=3, msg=name
        )
    wire = layer.dispatcher.wire
    return {
        "rows_remote": wire.rows_remote,
        "slots_remote": int(wire.slots_remote),
        "load": layer.expert_load.clone(),
        "ref_load": reference.expert_load.clone(),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "ep2-epshard2"])
def test_ep_layer_matches_single_process(world, ep):
    """Every case of CASES: outputs, loss and all gradients (ranks assert), and the summed expert load."""
    results = run_distributed(_ep_worker, world, ep)
    for case in CASES:
        per_rank = [r[case] for r in results]
        total_load = sum(r["load"] for r in per_rank)
        assert_equal(
            total_load, per_rank[0]["ref_load"]
        )  # integer counts: the reference saw every slice once
        if case.startswith("dedup"):  # several of a token's experts on one rank: it crossed the wire once
            assert sum(r["rows_remote"] for r in per_rank) < sum(r["slots_remote"] for r in per_rank)

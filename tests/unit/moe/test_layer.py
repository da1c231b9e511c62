"""The MoE layer against a per-token reference, its losses' gradients, padding, capacity and AC counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from automoe.config.moe import MoEConfig
from automoe.moe.custom import moe_from_modules
from automoe.moe.layer import MoE, collect_aux_loss
from tests.tolerance import assert_close_rounding, assert_equal

D, FF = 8, 12
# The layer vs a per-token reference (same routing: the reference calls the layer's gate on the same batch):
# one row's up (D terms) and down (FF terms) contractions in another GEMM blocking, then the K-way combine.
LAYER_TERMS, LAYER_DEPTH = max(D, FF), 3


def _layer(**kw) -> MoE:
    cfg = MoEConfig(dim=D, moe_inter_dim=FF, **kw)
    torch.manual_seed(0)
    layer = MoE(cfg)
    layer.init_weights(std=0.3)
    return layer


def _reference(layer: MoE, x_BSD: torch.Tensor, mask_BS=None) -> torch.Tensor:
    """Token by token: sum_k w_k * expert_{e_k}(x) (+ shared), written without the layer's dispatch code."""
    B, S, _ = x_BSD.shape
    x_TD = x_BSD.reshape(-1, D)
    route = layer.gate(x_TD, None)
    w_up, w_down = layer.experts.w_up, layer.experts.w_down
    out = []
    for t in range(B * S):
        y = torch.zeros(D)
        if mask_BS is None or not mask_BS.reshape(-1)[t]:
            for w, e in zip(route.weights_TK[t], route.indices_TK[t]):
                gate, up = (x_TD[t] @ w_up[e]).split(FF)
                y = y + w * ((F.silu(gate) * up) @ w_down[e])
        if layer.shared_experts is not None:
            y = y + layer.shared_experts(x_TD[t : t + 1])[0]
        out.append(y)
    return torch.stack(out).view(B, S, D)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_experts": 4, "num_activated_experts": 2},
        {
            "num_experts": 8,
            "num_activated_experts": 3,
            "score_func": "sigmoid",
            "correction_bias": True,
            "num_expert_groups": 4,
            "num_limited_groups": 2,
            "norm_topk_prob": True,
            "route_scale": 2.5,
        },
        {
            "num_experts": 4,
            "num_activated_experts": 2,
            "num_shared_experts": 2,
            "shared_expert_gate": True,
            "softmax_before_topk": False,
        },
        {"num_experts": 4, "num_activated_experts": 2, "experts_backend": "loop"},
    ],
    ids=["softmax", "dsv3-sigmoid-groups", "shared-gated-mixtral", "loop"],
)
def test_layer_matches_per_token_reference(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 5, D)
    assert_close_rounding(layer(x), _reference(layer, x), terms=LAYER_TERMS, depth=LAYER_DEPTH)


def test_padding_tokens_get_no_routed_output_and_no_statistics():
    layer = _layer(num_experts=4, num_activated_experts=2, aux_loss_coeff=1.0)
    x = torch.randn(2, 6, D)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3:] = True
    y = layer(x, mask)
    assert y[mask].abs().sum() == 0
    assert_close_rounding(y, _reference(layer, x, mask), terms=LAYER_TERMS, depth=LAYER_DEPTH)
    assert layer.expert_load.sum() == (~mask).sum() * 2
    # changing padded inputs changes nothing: not the output, not the load, not the aux loss
    aux = layer.loss_values["aux_loss"]
    load = layer.expert_load.clone()
    layer.reset_statistics()
    x2 = x.clone()
    x2[mask] = 100.0
    # bitwise: same shapes, and the padded rows never reach an expert, so every GEMM sees the same row counts
    assert_equal(layer(x2, mask)[~mask], y[~mask])
    assert torch.equal(layer.expert_load, load)
    assert_equal(layer.loss_values["aux_loss"], aux)


def test_aux_and_z_loss_gradients_reach_the_router():
    """grad(task + collected aux) == grad(task) + grad(explicit coeff*aux + zcoeff*z) for the router weight."""
    coeff, zcoeff = 0.3, 0.05
    layer = _layer(num_experts=4, num_activated_experts=2, aux_loss_coeff=coeff, z_loss_coeff=zcoeff)
    w = layer.gate.weight
    x = torch.randn(3, 4, D)
    (g_total,) = torch.autograd.grad(layer(x).square().sum() + collect_aux_loss(layer), w)
    (g_task,) = torch.autograd.grad(layer(x).square().sum(), w)

    logits = x.reshape(-1, D) @ w.t()
    probs = logits.softmax(-1)
    load = torch.bincount(probs.topk(2, dim=-1).indices.reshape(-1), minlength=4).float()
    aux = (load * 4 / (2 * logits.shape[0]) * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    (g_losses,) = torch.autograd.grad(coeff * aux + zcoeff * z, w)
    assert g_losses.abs().sum() > 0
    # one backward adds the two logit gradients before the T = 12 term contraction with x, the reference after it
    assert_close_rounding(
        g_total, g_task + g_losses, terms=12, depth=2, scale=(g_task.abs() + g_losses.abs()).max()
    )
    # logits over D, then a mean over the T = 12 tokens, then a sum (aux) / logsumexp (z) over E: 3 stages
    assert_close_rounding(layer.loss_values["aux_loss"], aux.detach(), terms=12, depth=3)
    assert_close_rounding(layer.loss_values["z_loss"], z.detach(), terms=12, depth=3)


def test_aux_loss_gradient_is_nonzero_and_scales_with_coefficient():
    grads = []
    for coeff in (0.0, 1.0, 2.0):
        layer = _layer(num_experts=4, num_activated_experts=2, aux_loss_coeff=coeff)
        layer(torch.randn(2, 8, D, generator=torch.Generator().manual_seed(3)))
        aux = collect_aux_loss(layer)
        grads.append(torch.zeros(4, D) if aux is None else torch.autograd.grad(aux, layer.gate.weight)[0])
    assert grads[0].abs().sum() == 0 and grads[1].abs().sum() > 0
    assert_equal(
        grads[2], 2 * grads[1]
    )  # same kernels and shapes; a factor 2 is exact and commutes with rounding


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_load_once_and_keeps_gradients(reentrant):
    # the reentrant variant runs the first forward under no_grad, so no aux loss can leave it (apply_ac uses
    # the non-reentrant one); the load must still be counted exactly once
    coeff = 0.0 if reentrant else 0.1
    plain = _layer(num_experts=4, num_activated_experts=2, aux_loss_coeff=coeff)
    ckpt = _layer(num_experts=4, num_activated_experts=2, aux_loss_coeff=coeff)
    x = torch.randn(2, 5, D, requires_grad=True)
    y1 = plain(x)
    (y1.sum() + (plain.aux_loss if coeff else 0)).backward()
    y2 = checkpoint(ckpt, x, use_reentrant=reentrant)
    (y2.sum() + (ckpt.aux_loss if coeff else 0)).backward()
    assert torch.equal(ckpt.expert_load, plain.expert_load)
    assert ckpt.expert_load.sum() == 2 * 5 * 2
    for (n, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        assert_equal(p2.grad, p1.grad, msg=n)  # the recompute is the same forward: same kernels, same shapes


class CountingReducer:
    """Stands in for the CP/DP all-reduces: counts the calls, and sums as if 2 (CP) and 3 (DP) ranks held
    identical data, so a recomputed loss that skipped a reduction would get other gradients."""

    def __init__(self) -> None:
        self.calls = 0

    def sum_over_sequence(self, t):
        self.calls += 1
        return 2 * t

    def sum_over_batch(self, t):
        self.calls += 1
        return 3 * t.detach()


@pytest.mark.parametrize("scope", ["global", "sequence", "micro_batch"])
def test_activation_checkpointing_repeats_no_statistics_collective(scope):
    """Recomputation in backward replays the forward's reduced statistics: the same number of collectives as
    without AC (none in the recompute), and the same gradients."""
    kw = dict(
        num_experts=4, num_activated_experts=2, aux_loss_coeff=0.1, aux_loss_type=scope, z_loss_coeff=0.01
    )
    plain, ckpt = _layer(**kw), _layer(**kw)
    plain.reducer, ckpt.reducer = CountingReducer(), CountingReducer()
    x = torch.randn(2, 5, D, requires_grad=True)
    for _ in range(2):  # two micro-batches: the replay must follow each forward
        (plain(x).sum() + plain.aux_loss).backward()
        y = checkpoint(ckpt, x, use_reentrant=False)
        (y.sum() + ckpt.aux_loss).backward()
    assert plain.reducer.calls > 0
    assert ckpt.reducer.calls == plain.reducer.calls
    # bitwise: the recompute is the same forward (same kernels, same shapes) fed the replayed statistics
    assert_equal(ckpt.aux_loss, plain.aux_loss)
    assert ckpt.loss_values.keys() == plain.loss_values.keys()
    for (n, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        assert_equal(p2.grad, p1.grad, msg=n)


def test_load_accumulates_over_micro_batches_and_global_scope_uses_it():
    layer = _layer(num_experts=4, num_activated_experts=2, aux_loss_coeff=1.0, aux_loss_type="global")
    xs = [torch.randn(1, 6, D) for _ in range(2)]
    loads = []
    for x in xs:
        layer(x)
        loads.append(layer.expert_load.clone())
    assert layer.step_tokens == 12
    # the second micro-batch's f_e uses the load of both micro-batches
    probs = (xs[1].reshape(-1, D) @ layer.gate.weight.t()).softmax(-1)
    expected = (loads[1] * 4 / (2 * 12) * probs.mean(0)).sum()
    # logits over D, a mean over the 6 tokens, a sum over E: 3 stages of <= D terms
    assert_close_rounding(layer.loss_values["aux_loss"], expected.detach(), terms=D, depth=3)


def test_capacity_factor_drops_lowest_weight_slots_and_counts_them():
    layer = _layer(num_experts=4, num_activated_experts=2, capacity_factor=0.5)
    x = torch.randn(1, 16, D)
    y = layer(x)
    capacity = math.ceil(0.5 * 16 * 2 / 4)
    route = layer.gate(x.reshape(-1, D), None)
    kept = torch.zeros(16, 2, dtype=torch.bool)
    for e in range(4):
        slots = [(t, k) for t in range(16) for k in range(2) if route.indices_TK[t, k] == e]
        slots.sort(key=lambda s: -route.weights_TK[s].item())
        for s in slots[:capacity]:
            kept[s] = True
    assert layer.dropped_slots == (~kept).sum()
    ref = torch.zeros(16, D)
    for t in range(16):
        for k in range(2):
            if kept[t, k]:
                e = route.indices_TK[t, k]
                gate, up = (x[0, t] @ layer.experts.w_up[e]).split(FF)
                ref[t] += route.weights_TK[t, k] * ((F.silu(gate) * up) @ layer.experts.w_down[e])
    assert_close_rounding(y[0], ref, terms=LAYER_TERMS, depth=LAYER_DEPTH)
    layer.eval()  # capacity applies in training only
    layer(x)
    assert layer.dropped_slots == (~kept).sum()


def test_eval_forward_counts_eval_load_only_and_records_no_loss():
    layer = _layer(num_experts=4, num_activated_experts=2, aux_loss_coeff=1.0)
    layer.eval()
    layer(torch.randn(1, 5, D))
    assert layer.expert_load.sum() == 0 and layer.eval_expert_load.sum() == 10
    assert layer.aux_loss is None


def test_moe_from_user_modules_matches_manual_computation():
    torch.manual_seed(0)
    experts = [
        torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, D)) for _ in range(3)
    ]
    router = torch.nn.Linear(D, 3, bias=False)
    layer = moe_from_modules(experts, router, top_k=2, dim=D)
    x = torch.randn(2, 4, D)
    y = layer(x)
    probs = router(x.reshape(-1, D)).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.stack(
        [sum(w[t, k] * experts[idx[t, k]](x.reshape(-1, D)[t]) for k in range(2)) for t in range(8)]
    )
    # per token vs batched: the user's Linear(D, 16) and Linear(16, D) contractions, then the K-way combine
    assert_close_rounding(y.reshape(-1, D), ref, terms=16, depth=3)
    with pytest.raises(ValueError, match="top_k=4"):
        moe_from_modules(experts, router, top_k=4, dim=D)

"""Balancing losses against explicit formulas, and CP-style statistic reduction."""

import torch

from automoe.moe.losses import aux_loss, z_loss
from automoe.moe.types import IdentityReducer
from tests.tolerance import assert_close_rounding


def _reference_aux(probs, idx, valid, E, K):
    """sum_e f_e P_e with f_e = L_e E / (K T), P_e = mean_t p_te over valid tokens, written as loops."""
    toks = [t for t in range(probs.shape[0]) if valid is None or valid[t]]
    T = len(toks)
    total = 0.0
    for e in range(E):
        load = sum(int((idx[t] == e).sum()) for t in toks)
        p_mean = sum(probs[t, e] for t in toks) / T
        total = total + load * E / (K * T) * p_mean
    return total


def _routing(T=16, E=6, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(K, dim=-1).indices
    return logits, probs, idx


def test_micro_batch_aux_matches_formula_and_grad_only_through_p():
    logits, probs, idx = _routing()
    valid = torch.ones(16, dtype=torch.bool)
    valid[[3, 9]] = False
    got = aux_loss(probs, idx, valid, batch=2, scope="micro_batch", reducer=IdentityReducer())
    ref = _reference_aux(probs, idx, valid, 6, 2)
    # vectorized vs loops: a mean over the T = 16 tokens, then a sum over E = 6: 2 reductions of <= 16 terms
    assert_close_rounding(got, ref, terms=16, depth=2)
    (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert_close_rounding(g_got, g_ref, terms=16, depth=3)  # + the softmax backward's E-term sum
    assert g_got[3].abs().sum() == 0


def test_sequence_aux_is_mean_of_per_sequence_losses_and_skips_empty_sequences():
    logits, probs, idx = _routing(T=24)
    valid = torch.ones(24, dtype=torch.bool)
    valid[16:] = False  # third sequence is all padding
    valid[2] = False
    got = aux_loss(probs, idx, valid, batch=3, scope="sequence", reducer=IdentityReducer())
    per_seq = [
        _reference_aux(probs[b * 8 : (b + 1) * 8], idx[b * 8 : (b + 1) * 8], valid[b * 8 : (b + 1) * 8], 6, 2)
        for b in range(2)
    ]
    # per sequence: a mean over its 8 tokens, a sum over E = 6, then the mean over sequences: 3 stages
    assert_close_rounding(got, (per_seq[0] + per_seq[1]) / 2, terms=8, depth=3)


def test_global_aux_uses_supplied_load():
    _, probs, idx = _routing()
    load = torch.tensor([10.0, 0.0, 4.0, 6.0, 8.0, 4.0])
    tokens = torch.tensor(16.0)
    got = aux_loss(
        probs,
        idx,
        None,
        batch=1,
        scope="global",
        reducer=IdentityReducer(),
        global_load_E=load,
        global_tokens=tokens,
    )
    ref = (load * 6 / (2 * 16) * probs.mean(0)).sum()
    assert_close_rounding(
        got, ref, terms=16, depth=2
    )  # a mean over T = 16, a sum over E = 6, in our op order


class _OtherHalfReducer:
    """Simulates a 2-rank CP group in one process: adds the statistics the other rank would contribute."""

    def __init__(self, other):
        self.other = list(other)

    def sum_over_sequence(self, t):
        return t + self.other.pop(0)

    def sum_over_batch(self, t):
        return t


def _split_stats_equal_full(scope):
    _, probs, idx = _routing(T=16, seed=3)
    B, S = 2, 8
    full = aux_loss(probs, idx, None, batch=B, scope=scope, reducer=IdentityReducer())
    halves = [
        torch.arange(S).view(1, S)[:, :4] + torch.tensor([[0], [8]]),
        torch.arange(S).view(1, S)[:, 4:] + torch.tensor([[0], [8]]),
    ]
    recorder = []

    class _Record:
        def sum_over_sequence(self, t):
            recorder.append(t.detach())
            return t

        def sum_over_batch(self, t):
            return t

    second = halves[1].reshape(-1)
    aux_loss(probs[second], idx[second], None, batch=B, scope=scope, reducer=_Record())
    first = halves[0].reshape(-1)
    got = aux_loss(probs[first], idx[first], None, batch=B, scope=scope, reducer=_OtherHalfReducer(recorder))
    # the statistics summed as two halves of a sequence plus the other rank's half vs in one sum: 2 stages of 16
    assert_close_rounding(got, full, terms=16, depth=2)


def test_cp_split_sequences_reduce_to_the_full_value():
    for scope in ("micro_batch", "sequence"):
        _split_stats_equal_full(scope)


def test_z_loss_matches_formula_with_padding():
    logits, _, _ = _routing()
    valid = torch.ones(16, dtype=torch.bool)
    valid[0] = False
    got = z_loss(logits, valid, reducer=IdentityReducer())
    ref = torch.stack([torch.log(torch.exp(logits[t]).sum()) ** 2 for t in range(1, 16)]).mean()
    assert_close_rounding(got, ref, terms=15, depth=2)  # log-sum-exp over E = 6, then a mean over 15 tokens

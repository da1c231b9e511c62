"""The `sequence` aux loss with packed documents: the mean over documents of each document's own loss, with
padding and with the documents' statistics split over two CP ranks; the other scopes ignore documents."""

import torch

from automoe.moe.losses import aux_loss
from automoe.moe.types import IdentityReducer
from tests.tolerance import assert_close_rounding, assert_equal

B, S, E, K = 2, 12, 6, 2
# row 0: documents of 5, 4 and 3 tokens; row 1: documents of 8 and 4 tokens, the last 3 positions padding
DOCUMENTS_BS = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 8 + [1] * 4])
NUM_DOCUMENTS = 3


def _routing(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * S, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    return logits, probs, probs.topk(K, dim=-1).indices


def _valid_T():
    valid_BS = torch.ones(B, S, dtype=torch.bool)
    valid_BS[1, -3:] = False
    return valid_BS.reshape(-1)


def _reference(probs, idx, valid_T):
    """Each document as its own micro-batch of one sequence, then the mean over the non-empty documents."""
    losses = []
    for b in range(B):
        for d in range(NUM_DOCUMENTS):
            tokens = (torch.arange(B * S) // S == b) & (DOCUMENTS_BS.reshape(-1) == d) & valid_T
            if tokens.any():
                losses.append(
                    aux_loss(
                        probs[tokens], idx[tokens], None, batch=1, scope="sequence", reducer=IdentityReducer()
                    )
                )
    return torch.stack(losses).mean()


def test_sequence_aux_loss_is_the_mean_of_per_document_losses():
    logits, probs, idx = _routing()
    valid_T = _valid_T()
    got = aux_loss(
        probs,
        idx,
        valid_T,
        batch=B,
        scope="sequence",
        reducer=IdentityReducer(),
        document_T=DOCUMENTS_BS.reshape(-1),
        num_documents=NUM_DOCUMENTS,
    )
    want = _reference(probs, idx, valid_T)
    # per document: a mean over <= 8 tokens, a sum over E = 6, the mean over 5 documents (counts are exact)
    assert_close_rounding(got, want, terms=8, depth=3)
    (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, logits)
    assert_close_rounding(g_got, g_want, terms=8, depth=4)  # + the softmax backward's E-term sum
    assert g_got.view(B, S, E)[1, -3:].abs().sum() == 0  # padding takes no part
    per_row = aux_loss(probs, idx, valid_T, batch=B, scope="sequence", reducer=IdentityReducer())
    assert (per_row - want).abs() > 1e-3  # rows are not documents


def test_other_scopes_ignore_document_ids():
    _, probs, idx = _routing(seed=1)
    step = dict(global_load_E=torch.tensor([9.0, 3.0, 8.0, 5.0, 10.0, 7.0]), global_tokens=torch.tensor(21.0))
    for scope in ("micro_batch", "global"):
        plain = aux_loss(probs, idx, _valid_T(), batch=B, scope=scope, reducer=IdentityReducer(), **step)
        with_docs = aux_loss(
            probs,
            idx,
            _valid_T(),
            batch=B,
            scope=scope,
            reducer=IdentityReducer(),
            **step,
            document_T=DOCUMENTS_BS.reshape(-1),
            num_documents=NUM_DOCUMENTS,
        )
        assert_equal(with_docs, plain)


class _Recorder:
    def __init__(self):
        self.sums = []

    def sum_over_sequence(self, t):
        self.sums.append(t.detach())
        return t

    def sum_over_batch(self, t):
        return t


class _PlusOtherRank:
    """A 2-rank CP group in one process: adds what the other rank contributed to each reduction."""

    def __init__(self, other):
        self.other = list(other)

    def sum_over_sequence(self, t):
        return t + self.other.pop(0)

    def sum_over_batch(self, t):
        return t


def test_documents_split_over_context_parallel_ranks_reduce_to_the_whole():
    """Zigzag halves (rank 0: chunks 0 and 3 of 4, rank 1: chunks 1 and 2): documents span both ranks."""
    _, probs, idx = _routing(seed=2)
    valid_T = _valid_T()
    c = S // 4
    local_S = [torch.cat([torch.arange(0, c), torch.arange(3 * c, 4 * c)]), torch.arange(c, 3 * c)]
    tokens = [(torch.arange(B)[:, None] * S + s[None, :]).reshape(-1) for s in local_S]

    def local_loss(rank, reducer):
        t = tokens[rank]
        return aux_loss(
            probs[t],
            idx[t],
            valid_T[t],
            batch=B,
            scope="sequence",
            reducer=reducer,
            document_T=DOCUMENTS_BS.reshape(-1)[t],
            num_documents=NUM_DOCUMENTS,
        )

    other = _Recorder()
    local_loss(1, other)
    got = local_loss(0, _PlusOtherRank(other.sums))
    want = _reference(probs, idx, valid_T)
    assert_close_rounding(got, want, terms=8, depth=3)  # two partial sums per document instead of one

"""Packed documents (`document_ids_BS`): block-causal masks; a packed window equals each document run alone
(logits and the per-document `sequence` aux loss; GQA and MLA with YaRN, with padding, under the CP seam)."""

import dataclasses

import pytest
import torch

from automoe.config.model import ModelConfig
from automoe.data import documents
from automoe.models.attention import PADDING_KEY, mask_keys, visibility_mask
from automoe.moe.layer import moe_layers
from tests.tolerance import assert_close_rounding
from tests.unit.models.test_transformer import RecordKV, ReplayKV, _cp_layout, build, model_rounding, tiny_cfg

EOS, VOCAB = 49, 50


def mla_yarn_cfg() -> ModelConfig:
    return tiny_cfg(
        attention="mla",
        num_kv_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        rope_interleave=True,
        rope_scaling="yarn",
        yarn_factor=4.0,
        yarn_original_max_seq_len=16,
        yarn_mscale=1.0,
        yarn_mscale_all_dim=1.0,
    )


def packed_rows(lengths: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """-> (tokens [B, S], the documents of each row): documents of the given lengths, each ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    rows, docs = [], []
    for row_lengths in lengths:
        row_docs = [
            torch.cat([torch.randint(0, EOS, (n - 1,), generator=g), torch.tensor([EOS])])
            for n in row_lengths
        ]
        docs.append(row_docs)
        rows.append(torch.cat(row_docs))
    return torch.stack(rows), docs


def test_mask_keys_make_attention_block_causal_and_keep_padding_out():
    tokens_BS, _ = packed_rows([[3, 6, 1, 6], [16]])
    ids_BS = documents.document_ids(tokens_BS, EOS)
    pad_BS = torch.zeros_like(ids_BS, dtype=torch.bool)
    pad_BS[1, 10:] = True
    S = tokens_BS.shape[1]
    order_BS = torch.arange(S).expand_as(ids_BS)
    keys_BS, lowest_BS = mask_keys(order_BS, padding_mask_BS=pad_BS, document_ids_BS=ids_BS)
    mask_BSS = visibility_mask(keys_BS, keys_BS, lowest_BS)[:, 0]
    causal_SS = torch.ones(S, S, dtype=torch.bool).tril()
    same_doc_BSS = ids_BS[:, :, None] == ids_BS[:, None, :]
    want_BSS = causal_SS & same_doc_BSS & ~pad_BS[:, None, :]
    real_BS = ~pad_BS
    assert torch.equal(mask_BSS[real_BS], want_BSS[real_BS])  # real queries: causal, own document, no padding
    assert mask_BSS.diagonal(dim1=1, dim2=2).all()  # every query (padding too) sees itself: finite outputs
    assert (keys_BS[pad_BS] == PADDING_KEY).all()


def _logits_per_document(model, docs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [[model(doc[None])[0] for doc in row] for row in docs]


@pytest.mark.parametrize("kind", ["gqa", "gqa-qknorm", "mla-yarn"])
def test_packed_window_logits_equal_each_document_run_alone(kind):
    cfg = {"gqa": tiny_cfg(), "gqa-qknorm": tiny_cfg(qk_norm=True), "mla-yarn": mla_yarn_cfg()}[kind]
    model = build(cfg).eval()
    # row 0: four documents (one of a single EOS); row 1: one document; row 2: two documents, then padding
    tokens_BS, docs = packed_rows([[5, 9, 1, 9], [24], [7, 11, 6]])
    ids_BS = documents.document_ids(tokens_BS, EOS)
    pad_BS = torch.zeros_like(tokens_BS, dtype=torch.bool)
    pad_BS[2, 18:] = True
    ids_BS = ids_BS.masked_fill(pad_BS, 0)
    positions_BS = documents.document_positions(ids_BS)
    with torch.no_grad():
        packed = model(tokens_BS, positions_BS=positions_BS, padding_mask_BS=pad_BS, document_ids_BS=ids_BS)
        unmasked = model(tokens_BS)
    alone = _logits_per_document(model, docs)
    for b, row in enumerate(alone):
        start = 0
        for d, want in enumerate(row):
            end = start + len(want)
            if pad_BS[b, start:end].any():
                break
            # the same math on other row counts and over masked keys: reordering error only
            assert_close_rounding(
                packed[b, start:end], want, **model_rounding(cfg), msg=f"row {b} document {d}"
            )
            start = end
    assert (packed[0, 5:] - unmasked[0, 5:]).abs().max() > 1e-3  # without the mask the documents do interact


def _aux_losses(model) -> list[torch.Tensor]:
    return [layer.loss_values["aux_loss"] for _, layer in moe_layers(model)]


def test_sequence_aux_loss_is_the_mean_over_documents_run_alone():
    moe = dataclasses.replace(tiny_cfg().moe, aux_loss_type="sequence", aux_loss_coeff=0.01)
    cfg = tiny_cfg(moe=moe)
    model = build(cfg).train()
    tokens_BS, docs = packed_rows([[5, 9, 1, 9], [24], [7, 11, 6]], seed=1)
    ids_BS = documents.document_ids(tokens_BS, EOS)
    model(tokens_BS, positions_BS=documents.document_positions(ids_BS), document_ids_BS=ids_BS)
    packed = _aux_losses(model)
    alone = []  # [documents][layers]
    for row in docs:
        for doc in row:
            model(doc[None])
            alone.append(_aux_losses(model))
    want = torch.stack([torch.stack(layers) for layers in alone]).mean(0)
    # per-document f and P from sums of <= 24 tokens' probabilities over hidden states equal up to rounding
    assert_close_rounding(torch.stack(packed), want, **model_rounding(cfg))
    model(tokens_BS)  # per row instead: a different value (the documents' statistics mix)
    assert (torch.stack(_aux_losses(model)) - want).abs().max() > 1e-4


def test_num_documents_is_required_under_context_parallelism():
    model = build(tiny_cfg()).eval()
    tokens_BS, _ = packed_rows([[4, 4]])
    ids_BS = documents.document_ids(tokens_BS, EOS)
    for block in model.layers.values():
        block.attention.kv_gather = RecordKV()
    with pytest.raises(ValueError, match="num_documents"):
        model(tokens_BS, document_ids_BS=ids_BS)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("layout", ["cp2-contiguous", "cp2-zigzag"])
def test_context_parallel_pieces_of_a_packed_window_match_the_whole(layout, padded):
    """The CP seam with documents (fake gather in one process); restarting positions order the keys."""
    cfg = tiny_cfg(qk_norm=True)
    model = build(cfg).eval()
    tokens_BS, _ = packed_rows(
        [[3, 7, 6], [9, 7]]
    )  # documents cross the chunk boundaries (S=16, chunks of 4)
    B, S = tokens_BS.shape
    ids_BS = documents.document_ids(tokens_BS, EOS)
    pad_BS = None
    if padded:
        pad_BS = torch.zeros(B, S, dtype=torch.bool)
        pad_BS[1, 11:] = True
        ids_BS = ids_BS.masked_fill(pad_BS, 0)
    pos_BS = documents.document_positions(ids_BS)
    n = documents.num_documents(ids_BS)
    attns = [blk.attention for blk in model.layers.values()]
    with torch.no_grad():
        whole = model(tokens_BS, positions_BS=pos_BS, padding_mask_BS=pad_BS, document_ids_BS=ids_BS)
        recorders = [RecordKV() for _ in attns]
        for attn, rec in zip(attns, recorders):
            attn.kv_gather = rec
        gathered = model(
            tokens_BS, positions_BS=pos_BS, padding_mask_BS=pad_BS, document_ids_BS=ids_BS, num_documents=n
        )
        assert_close_rounding(gathered, whole, **model_rounding(cfg))
        pieces = _cp_layout(S, layout)
        order = torch.cat(pieces)
        for idx in pieces:
            for attn, rec in zip(attns, recorders):
                attn.kv_gather = ReplayKV(rec, idx, order, cfg)
            got = model(
                tokens_BS[:, idx],
                positions_BS=pos_BS[:, idx],
                padding_mask_BS=None if pad_BS is None else pad_BS[:, idx],
                document_ids_BS=ids_BS[:, idx],
                num_documents=n,
            )
            assert_close_rounding(got, whole[:, idx], **model_rounding(cfg))  # half the rows per GEMM

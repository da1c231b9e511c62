"""Documents in packed windows: ids (an EOS ends its document), positions restarting per document, the
loader's document fields (padding rows are one document) and `data.document_masking` resolution per source."""

import numpy as np
import pytest
import torch

from automoe.config.data import DataConfig
from automoe.data import TokenDataset, build_datasets, documents, val_batches

EOS, PAD = 9, 10


def test_ids_positions_and_count():
    tokens_BS = torch.tensor([[1, 2, EOS, 3, EOS, EOS, 4, 5], [EOS, 6, 7, 8, 1, 2, 3, 4]])
    ids_BS = documents.document_ids(tokens_BS, EOS)
    # each EOS belongs to the document it ends; the next one starts right after it
    assert ids_BS.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    positions_BS = documents.document_positions(ids_BS)
    assert positions_BS.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert documents.num_documents(ids_BS) == 4


def _dataset(document_masking: bool) -> TokenDataset:
    stream = np.array([1, 2, EOS, 3, 4, 5, EOS, 6, EOS, 7, 8, 1, 2], dtype=np.int64)
    return TokenDataset(
        stream, seq_len=4, vocab_size=11, eos_id=EOS, pad_id=PAD, document_masking=document_masking
    )


def test_loader_yields_document_fields_and_one_document_per_padding_row():
    (mbs,) = val_batches(_dataset(True), global_batch_size=4, micro_batch_size=4)  # 3 samples + 1 padding row
    (mb,) = mbs
    assert mb["input_ids"].tolist() == [[1, 2, EOS, 3], [4, 5, EOS, 6], [EOS, 7, 8, 1], [PAD] * 4]
    assert mb["document_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert mb["positions"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 2, 3]]
    assert mb["num_documents"] == 2
    (plain,) = next(iter(val_batches(_dataset(False), global_batch_size=4, micro_batch_size=4)))
    assert not {"document_ids", "positions", "num_documents"} & plain.keys()


@pytest.mark.parametrize(
    ("source", "setting", "on"),
    [("stdlib", None, True), ("synthetic", None, False), ("synthetic", True, True), ("stdlib", False, False)],
)
def test_document_masking_default_is_on_for_real_documents_only(source, setting, on):
    cfg = DataConfig(
        source=source,
        document_masking=setting,
        max_bytes=20_000,
        synthetic_num_tokens=4096,
        val_fraction=0.1,
        seq_len=32,
    )
    assert cfg.masks_documents is on
    train, val = build_datasets(cfg)
    assert train.document_masking is on and val.document_masking is on

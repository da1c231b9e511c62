"""Token-stream datasets: fixed-length windows over one token stream, and `build_datasets` (train/val split).

A sample i is the window tokens[i*S : i*S + S + 1] (S = seq_len): inputs are its first S ids and
labels its last S, so windows do not overlap and documents are packed across sample boundaries. With
`DataConfig.document_masking` the batches say where the documents are (`automoe.data.documents`), so that no
token attends across a document boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automoe.config.data import DataConfig
from automoe.data import sources
from automoe.data.token_file import read_token_file
from automoe.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_GLOBS = {"text": "*.txt", "jsonl": "*.jsonl"}


@dataclass
class TokenDataset:
    """Windows of `seq_len + 1` ids over `tokens` [num_tokens] (a numpy array or a read-only memmap)."""

    tokens: np.ndarray  # [num_tokens] token ids, any unsigned/signed int dtype
    seq_len: int  # S: tokens per sample's input (and label) row
    vocab_size: int  # ids lie in [0, vocab_size): the model's embedding size
    eos_id: int  # separates documents in the stream
    pad_id: int  # input id of padding rows (their labels are ignored)
    name: str = "data"  # for messages and logs
    document_masking: bool = False  # batches carry document ids: attention and sequence aux loss per document

    def __post_init__(self) -> None:
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(
                f"DataConfig.seq_len={self.seq_len} is too long for {self.name}: a sample needs "
                f"seq_len+1={self.seq_len + 1} tokens, the data has {len(self.tokens)}"
            )

    def __len__(self) -> int:
        """Number of samples (non-overlapping windows)."""
        return (len(self.tokens) - 1) // self.seq_len

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def windows(self, indices: Sequence[int]) -> np.ndarray:
        """-> int64 [len(indices), S+1]: the windows of the given sample indices (each in [0, len))."""
        S = self.seq_len
        out = np.empty((len(indices), S + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self.tokens[i * S : i * S + S + 1]
        return out


def check_exists(path: str, field: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"DataConfig.{field}={path!r} does not exist")
    return p


def _document_tokens(cfg: DataConfig, tokenizer: Tokenizer, path: str | None, field: str) -> np.ndarray:
    """Read the documents of a stdlib/text/jsonl/datasets source and turn them into one token stream [N]."""
    if cfg.source == "stdlib":
        docs = sources.iter_stdlib_documents()
        where = f"the stdlib at {sources.stdlib_root()}"
    elif cfg.source == "datasets":
        check_exists(path, field)
        docs = sources.iter_datasets_documents(path, text_field=cfg.text_field, split=cfg.dataset_split)
        where = f"DataConfig.{field}={path!r}"
    else:
        glob = cfg.file_glob or DEFAULT_GLOBS[cfg.source]
        files = sources.list_files(check_exists(path, field), glob)
        if not files:
            raise ValueError(f"DataConfig.{field}={path!r} holds no files matching file_glob={glob!r}")
        if cfg.source == "text":
            docs = sources.iter_text_documents(files)
        else:
            docs = sources.iter_jsonl_documents(files, text_field=cfg.text_field)
        where = f"DataConfig.{field}={path!r}"
    texts = [text for _, text in sources.cap_bytes(docs, cfg.max_bytes)]
    if not any(texts):
        raise ValueError(f"{where} holds no text (source={cfg.source!r})")
    if cfg.shuffle_documents:  # so the validation tail is a random sample of documents, not the last files
        order = np.random.default_rng(cfg.seed).permutation(len(texts))
        texts = [texts[i] for i in order]
    logger.info("read %d documents (%d chars) from %s", len(texts), sum(map(len, texts)), where)
    return sources.documents_to_tokens(texts, tokenizer)


def _dataset(tokens: np.ndarray, cfg: DataConfig, *, vocab_size: int, eos_id: int, pad_id: int, name: str):
    return TokenDataset(
        tokens,
        seq_len=cfg.seq_len,
        vocab_size=vocab_size,
        eos_id=eos_id,
        pad_id=pad_id,
        name=name,
        document_masking=cfg.masks_documents,
    )


def _load_stream(cfg: DataConfig, tokenizer: Tokenizer, path: str | None, field: str):
    """-> (tokens [N], vocab_size, eos_id, pad_id) of one source."""
    if cfg.source == "synthetic":
        vocab = ByteTokenizer(cfg.synthetic_vocab_size)
        tokens = sources.synthetic_tokens(
            cfg.synthetic_num_tokens,
            num_content_ids=cfg.synthetic_vocab_size,
            branching=cfg.synthetic_branching,
            doc_len=cfg.synthetic_doc_len,
            eos_id=vocab.eos_id,
            seed=cfg.seed,
        )
        return tokens, vocab.vocab_size, vocab.eos_id, vocab.pad_id
    if cfg.source == "tokens":  # the sidecar's tokenizer is checked against the model's at start-up
        tokens, meta = read_token_file(check_exists(path, field), field=field)
        pad = meta["pad_id"] if meta.get("pad_id") is not None else meta["eos_id"]
        return tokens, int(meta["vocab_size"]), int(meta["eos_id"]), int(pad)
    tokens = _document_tokens(cfg, tokenizer, path, field)
    return tokens, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id


def build_datasets(
    cfg: DataConfig, tokenizer: Tokenizer | None = None
) -> tuple[TokenDataset, TokenDataset | None]:
    """-> (train, val) datasets; val is None when `val_fraction == 0` and no `val_path` is set.

    The split is deterministic: `val_path` when given, else the last `val_fraction` of the token
    stream (after the seeded document shuffle). Synthetic data brings its own vocab
    (`synthetic_vocab_size + 3`); read `train.vocab_size` to size the model. `tokenizer` encodes the text sources
    (default: `load_tokenizer(cfg.tokenizer)`, the byte tokenizer when unset).
    """
    if tokenizer is None:
        tokenizer = (
            load_tokenizer(cfg.tokenizer, key="data.tokenizer")
            if cfg.source != "synthetic"
            else ByteTokenizer()
        )
    tokens, vocab_size, eos_id, pad_id = _load_stream(cfg, tokenizer, cfg.path, "path")
    ids = dict(vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id)
    if cfg.val_path and cfg.source in ("text", "jsonl", "datasets", "tokens"):
        val_tokens, *_ = _load_stream(cfg, tokenizer, cfg.val_path, "val_path")
        train = _dataset(tokens, cfg, name="train", **ids)
        val = _dataset(val_tokens, cfg, name="val", **ids)
    elif cfg.val_fraction > 0:
        num_val = int(round(len(tokens) * cfg.val_fraction))
        if num_val < cfg.seq_len + 1:
            raise ValueError(
                f"DataConfig.val_fraction={cfg.val_fraction} of {len(tokens)} tokens leaves {num_val} for "
                f"validation, fewer than seq_len+1={cfg.seq_len + 1}: raise val_fraction or use more data"
            )
        train = _dataset(tokens[: len(tokens) - num_val], cfg, name="train", **ids)
        val = _dataset(tokens[len(tokens) - num_val :], cfg, name="val", **ids)
    else:
        train, val = _dataset(tokens, cfg, name="train", **ids), None
    logger.info(
        "data source=%s: train %d tokens (%d samples), val %s tokens, seq_len %d, vocab %d, "
        "document masking %s",
        cfg.source,
        train.num_tokens,
        len(train),
        val.num_tokens if val else 0,
        cfg.seq_len,
        vocab_size,
        "on" if cfg.masks_documents else "off",
    )
    return train, val

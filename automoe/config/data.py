"""`DataConfig`: which corpus to read, how it is tokenized and split (batch sizes live in the train config)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from automoe.config.checks import check_choice

SOURCES = ("synthetic", "stdlib", "text", "jsonl", "datasets", "tokens")
PATH_SOURCES = ("text", "jsonl", "datasets", "tokens")
TEXT_SOURCES = ("stdlib", "text", "jsonl", "datasets")  # tokenized at start-up with `tokenizer`


@dataclass
class DataConfig:
    """Every knob of the data pipeline. Invalid values raise `ValueError` naming the field."""

    # --- what to read ---
    source: str = "stdlib"  # synthetic | stdlib (Python sources) | text | jsonl | datasets | tokens (memmap)
    path: Optional[str] = None  # text/jsonl/datasets: file or directory; tokens: the .bin (+ .json sidecar)
    val_path: Optional[str] = None  # held-out file/dir of the same source kind; then val_fraction is ignored
    file_glob: Optional[str] = None  # files read from a directory (recursive); None = *.txt / *.jsonl
    text_field: str = "text"  # jsonl/datasets: key of the document string in every record
    dataset_split: str = "train"  # datasets: split of a save_to_disk DatasetDict (data files: their only one)
    # stdlib/text/jsonl/datasets: byte | an HF tokenizer dir / tokenizer.json / hub id in the local HF cache;
    # null = byte, or hf.init_from's tokenizer when that directory has one. tokens: checked against the sidecar
    tokenizer: Optional[str] = None
    max_bytes: Optional[int] = 4_000_000  # stdlib/text/jsonl: cap on UTF-8 bytes read; None = all

    # --- how it is cut ---
    seq_len: int = 128  # tokens per sequence S (a sample reads S+1: inputs + shifted labels)
    val_fraction: float = 0.05  # tail share of the token stream held out for validation; 0 = none
    shuffle: bool = True  # shuffle sample order each epoch (seeded, epoch-aware); False = stream order
    shuffle_documents: bool = True  # stdlib/text/jsonl: seeded document order, so the val tail is random docs
    seed: int = 0  # seeds synthetic generation, document permutation and the per-epoch sample shuffle
    # attention block-causal within documents, positions restarting per document, the `sequence` aux loss per
    # document; None = on for stdlib/text/jsonl/tokens, off for synthetic (chains of one Markov table)
    document_masking: Optional[bool] = None

    # --- synthetic source: a seeded sparse Markov chain the model can learn ---
    synthetic_num_tokens: int = 1 << 20  # total tokens generated (train + val), EOS separators included
    synthetic_vocab_size: int = 256  # content token ids [0, n); BOS/EOS/PAD follow, so the vocab is n + 3
    synthetic_branching: int = 4  # successors per token; the achievable loss is <= ln(branching)
    synthetic_doc_len: int = 512  # content tokens per synthetic document (an EOS follows each)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def masks_documents(self) -> bool:
        """`document_masking` resolved: None means on for every source but synthetic."""
        if self.document_masking is None:
            return self.source != "synthetic"
        return self.document_masking

    def validate(self) -> None:
        check_choice("DataConfig.source", self.source, SOURCES)
        if self.source in PATH_SOURCES and not self.path:
            raise ValueError(f"DataConfig.path={self.path!r} is required for source={self.source!r}")
        if self.seq_len < 1:
            raise ValueError(f"DataConfig.seq_len={self.seq_len} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"DataConfig.max_bytes={self.max_bytes} must be >= 1 or None (read everything)")
        if self.seed < 0:
            raise ValueError(f"DataConfig.seed={self.seed} must be >= 0")
        if not self.text_field:
            raise ValueError(f"DataConfig.text_field={self.text_field!r} must be a non-empty key")
        for name in (
            "synthetic_num_tokens",
            "synthetic_vocab_size",
            "synthetic_branching",
            "synthetic_doc_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 1")
        if self.synthetic_branching > self.synthetic_vocab_size:
            raise ValueError(
                f"DataConfig.synthetic_branching={self.synthetic_branching} exceeds "
                f"synthetic_vocab_size={self.synthetic_vocab_size}"
            )
        self._warn_ineffective()

    def _warn_ineffective(self) -> None:
        def warn(msg: str) -> None:
            warnings.warn(f"DataConfig: {msg}", UserWarning, stacklevel=4)

        if self.source not in PATH_SOURCES and (self.path or self.val_path):
            warn(f"path/val_path have no effect with source={self.source!r}")
        if self.source not in ("jsonl", "datasets") and self.text_field != "text":
            warn(f"text_field={self.text_field!r} has no effect with source={self.source!r}")
        if self.source not in ("text", "jsonl") and self.file_glob is not None:
            warn(f"file_glob={self.file_glob!r} has no effect with source={self.source!r}")
        if self.source != "datasets" and self.dataset_split != "train":
            warn(f"dataset_split={self.dataset_split!r} has no effect with source={self.source!r}")
        if self.source == "synthetic" and self.tokenizer is not None:
            warn(f"tokenizer={self.tokenizer!r} has no effect with source='synthetic' (ids, no text)")

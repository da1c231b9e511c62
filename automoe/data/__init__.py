"""Data pipeline: byte tokenizer, corpora (synthetic, stdlib, text, JSONL, memmap tokens), sharded loader."""

from automoe.data.dataset import TokenDataset, build_datasets
from automoe.data.loader import IGNORE_INDEX, StatefulLoader, val_batches
from automoe.data.token_file import TokenFileWriter, read_token_file
from automoe.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "StatefulLoader",
    "TokenDataset",
    "TokenFileWriter",
    "Tokenizer",
    "build_datasets",
    "read_token_file",
    "val_batches",
]

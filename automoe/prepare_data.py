"""Tokenize a corpus (Python's stdlib, text/JSONL files, a local `datasets` dataset) into a memory-mappable token
file + JSON sidecar.

    python -m automoe.prepare_data --source jsonl --input data/corpus.jsonl --output data/tok/train.bin \
        --val-fraction 0.01
    # then train with: data.source=tokens data.path=data/tok/train.bin data.val_path=data/tok/train_val.bin
    python -m automoe.prepare_data --source datasets --input data/saved_dataset --tokenizer ckpt/qwen3 \
        --output data/qwen/train.bin --val-fraction 0.01

--tokenizer is the byte tokenizer by default, else a local directory / tokenizer.json of a Hugging Face tokenizer,
or a hub id already in the local HF cache (never downloaded). The sidecar records it (name, path, fingerprint,
vocab size, special ids); training refuses a model whose tokenizer differs.

Documents are streamed (never all in memory), each followed by EOS. With --val-fraction f every
document goes to `<stem>_val.bin` with probability f (seeded, so reruns give the same split).
"""

from __future__ import annotations

import argparse
import logging

from automoe.data.prepare import SOURCES, prepare_token_file
from automoe.data.tokenizer import load_tokenizer

__all__ = ["main", "prepare_token_file"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument(
        "--input", help="file or directory (text/jsonl; datasets: data files or a save_to_disk directory)"
    )
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="byte | HF tokenizer dir / tokenizer.json | hub id in the HF cache",
    )
    parser.add_argument(
        "--eos-token", default=None, help="HF tokenizer: end-of-document token (default: its own)"
    )
    parser.add_argument("--split", default="train", help="datasets: the split of a saved DatasetDict")
    parser.add_argument(
        "--streaming", action="store_true", help="datasets: read record by record (larger than memory)"
    )
    parser.add_argument("--output", required=True, help="token file to write, e.g. data/train.bin")
    parser.add_argument("--text-field", default="text", help="jsonl/datasets: key of the document text")
    parser.add_argument(
        "--file-glob", default=None, help="directories: files to read (default *.txt / *.jsonl)"
    )
    parser.add_argument(
        "--max-bytes", type=int, default=None, help="stop after this many UTF-8 bytes of text"
    )
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=0, help="seeds the document split")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="processes encoding batches of documents (output unchanged)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tokenizer = load_tokenizer(args.tokenizer, key="--tokenizer", eos_token=args.eos_token)
    except ValueError as e:
        parser.error(str(e))
    prepare_token_file(
        args.source,
        args.input,
        args.output,
        tokenizer=tokenizer,
        split=args.split,
        streaming=args.streaming,
        num_workers=args.num_workers,
        text_field=args.text_field,
        file_glob=args.file_glob,
        max_bytes=args.max_bytes,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()

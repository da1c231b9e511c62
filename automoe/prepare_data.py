"""Tokenize a text/JSONL corpus (or Python's stdlib) into a memory-mappable token file + JSON sidecar.

    python -m automoe.prepare_data --source jsonl --input data/corpus.jsonl --output data/tok/train.bin \
        --val-fraction 0.01
    # then train with: data.source=tokens data.path=data/tok/train.bin data.val_path=data/tok/train_val.bin

Documents are streamed (never all in memory), each followed by EOS. With --val-fraction f every
document goes to `<stem>_val.bin` with probability f (seeded, so reruns give the same split).
"""

from __future__ import annotations

import argparse
import logging

from automoe.data.prepare import prepare_token_file

__all__ = ["main", "prepare_token_file"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=["stdlib", "text", "jsonl"], required=True)
    parser.add_argument("--input", help="file or directory (text/jsonl)")
    parser.add_argument("--output", required=True, help="token file to write, e.g. data/train.bin")
    parser.add_argument("--text-field", default="text", help="jsonl: key of the document text")
    parser.add_argument(
        "--file-glob", default=None, help="directories: files to read (default *.txt / *.jsonl)"
    )
    parser.add_argument(
        "--max-bytes", type=int, default=None, help="stop after this many UTF-8 bytes of text"
    )
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=0, help="seeds the document split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare_token_file(
        args.source,
        args.input,
        args.output,
        text_field=args.text_field,
        file_glob=args.file_glob,
        max_bytes=args.max_bytes,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()

"""Tokenize a text/JSONL corpus (or Python's stdlib) into a memory-mappable token file + JSON sidecar.

Documents are streamed (never all in memory), each followed by EOS; the command line is `python -m
automoe.prepare_data`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from automoe.data import sources
from automoe.data.dataset import DEFAULT_GLOBS
from automoe.data.token_file import TokenFileWriter
from automoe.data.tokenizer import ByteTokenizer, Tokenizer

logger = logging.getLogger("prepare_data")


def val_output_path(output: str | Path) -> Path:
    """Where the held-out documents go: `train.bin` -> `train_val.bin`."""
    output = Path(output)
    return output.with_name(f"{output.stem}_val{output.suffix}")


def iter_documents(
    source: str,
    input_path: str | None,
    *,
    text_field: str = "text",
    file_glob: str | None = None,
    max_bytes: int | None = None,
):
    """(name, text) documents of `source` (stdlib | text | jsonl), capped at `max_bytes` UTF-8 bytes."""
    if source == "stdlib":
        docs = sources.iter_stdlib_documents()
    elif source in DEFAULT_GLOBS:
        if input_path is None or not Path(input_path).exists():
            raise ValueError(f"--input={input_path!r} does not exist (needed for --source={source})")
        files = sources.list_files(Path(input_path), file_glob or DEFAULT_GLOBS[source])
        if not files:
            raise ValueError(
                f"--input={input_path!r} holds no files matching {file_glob or DEFAULT_GLOBS[source]!r}"
            )
        if source == "text":
            docs = sources.iter_text_documents(files)
        else:
            docs = sources.iter_jsonl_documents(files, text_field=text_field)
    else:
        raise ValueError(f"--source={source!r} is not one of ['stdlib', 'text', 'jsonl']")
    return sources.cap_bytes(docs, max_bytes)


def prepare_token_file(
    source: str,
    input_path: str | None,
    output: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    text_field: str = "text",
    file_glob: str | None = None,
    max_bytes: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `output` (and `<stem>_val.bin` when val_fraction > 0); -> {"train": meta, "val": meta | None}."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction={val_fraction} must be in [0, 1)")
    tokenizer = tokenizer or ByteTokenizer()
    encode = getattr(tokenizer, "encode_array", tokenizer.encode)
    ids = dict(
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        tokenizer=type(tokenizer).__name__,
    )
    rng = np.random.default_rng(seed)
    num_docs = {"train": 0, "val": 0}
    docs = iter_documents(source, input_path, text_field=text_field, file_glob=file_glob, max_bytes=max_bytes)
    with ExitStack() as stack:  # on an error no sidecar is written, so no half file looks complete
        train = stack.enter_context(TokenFileWriter(output, **ids))
        val = (
            stack.enter_context(TokenFileWriter(val_output_path(output), **ids)) if val_fraction > 0 else None
        )
        for _, text in docs:
            to_val = val is not None and rng.random() < val_fraction
            writer = val if to_val else train
            writer.write(np.append(np.asarray(encode(text), dtype=np.int64), tokenizer.eos_id))
            num_docs["val" if to_val else "train"] += 1
    result = {"train": train.close(), "val": val.close() if val is not None else None}
    logger.info("wrote %s: %d documents, %d tokens", output, num_docs["train"], result["train"]["num_tokens"])
    if val is not None:
        logger.info(
            "wrote %s: %d documents, %d tokens", val.path, num_docs["val"], result["val"]["num_tokens"]
        )
    return result

"""Tokenize a corpus (Python's stdlib, text/JSONL files, a local `datasets` dataset) into a memory-mappable token
file + JSON sidecar that records the tokenizer.

Documents are streamed (never all in memory) in batches (an HF tokenizer encodes a batch on every core), each
followed by EOS (and preceded by BOS when the tokenizer's own encoding adds one); the command line is `python -m
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
from automoe.data.tokenizer import ByteTokenizer, Tokenizer, tokenizer_info

logger = logging.getLogger("prepare_data")
SOURCES = ("stdlib", "text", "jsonl", "datasets")
BATCH_DOCUMENTS = 256  # documents encoded per batch


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
    split: str = "train",
    streaming: bool = False,
):
    """(name, text) documents of `source` (stdlib | text | jsonl | datasets), capped at `max_bytes` UTF-8 bytes."""
    if source == "stdlib":
        docs = sources.iter_stdlib_documents()
    elif source == "datasets":
        if input_path is None:
            raise ValueError("--input is required for --source=datasets (data files or a save_to_disk dir)")
        docs = sources.iter_datasets_documents(
            input_path, text_field=text_field, split=split, streaming=streaming
        )
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
        raise ValueError(f"--source={source!r} is not one of {list(SOURCES)}")
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
    split: str = "train",
    streaming: bool = False,
    progress: bool | None = None,
    num_workers: int = 1,
) -> dict[str, Any]:
    """Write `output` (and `<stem>_val.bin` when val_fraction > 0); -> {"train": meta, "val": meta | None}.

    `tokenizer`: default the byte tokenizer (`automoe.data.tokenizer.load_tokenizer` gives an HF one); its
    name, path, fingerprint, vocab size and special ids go into the sidecars. `progress`: a tqdm bar over
    documents (None = only on a terminal). `num_workers` > 1 encodes batches of documents in that many forked
    processes (same output: batches are written in order); 1 encodes here (an HF tokenizer's batch still uses
    every core)."""
    from tqdm import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if num_workers < 1:
        raise ValueError(f"--num-workers={num_workers} must be >= 1")
    tokenizer = tokenizer or ByteTokenizer()
    info = tokenizer_info(tokenizer)
    ids = dict(
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        tokenizer=info["tokenizer"],
        extra={k: info[k] for k in ("tokenizer_path", "tokenizer_fingerprint", "add_bos")},
    )
    rng = np.random.default_rng(seed)
    num_docs = {"train": 0, "val": 0}
    docs = iter_documents(
        source,
        input_path,
        text_field=text_field,
        file_glob=file_glob,
        max_bytes=max_bytes,
        split=split,
        streaming=streaming,
    )
    bar = tqdm(
        docs, unit=" docs", disable=None if progress is None else not progress, desc=f"tokenizing {source}"
    )
    with ExitStack() as stack:  # on an error no sidecar is written, so no half file looks complete
        train = stack.enter_context(TokenFileWriter(output, **ids))
        val = (
            stack.enter_context(TokenFileWriter(val_output_path(output), **ids)) if val_fraction > 0 else None
        )
        for encoded in _encoded_batches(tokenizer, (text for _, text in bar), num_workers):
            for doc_ids in encoded:
                to_val = val is not None and rng.random() < val_fraction
                (val if to_val else train).write(doc_ids)
                num_docs["val" if to_val else "train"] += 1
    bar.close()
    result = {"train": train.close(), "val": val.close() if val is not None else None}
    logger.info("wrote %s: %d documents, %d tokens", output, num_docs["train"], result["train"]["num_tokens"])
    if val is not None:
        logger.info(
            "wrote %s: %d documents, %d tokens", val.path, num_docs["val"], result["val"]["num_tokens"]
        )
    return result


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_WORKER_TOKENIZER: list[Tokenizer] = []  # the tokenizer a forked worker inherited


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encode_documents(_WORKER_TOKENIZER[0], texts)


def _encoded_batches(tokenizer: Tokenizer, texts, num_workers: int):
    """Each batch of BATCH_DOCUMENTS texts as encoded documents, in order (forked workers when num_workers > 1)."""
    batches = _batches(texts, BATCH_DOCUMENTS)
    if num_workers == 1:
        yield from (_encode_documents(tokenizer, batch) for batch in batches)
        return
    import multiprocessing

    _WORKER_TOKENIZER[:] = [tokenizer]
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        yield from pool.imap(_encode_in_worker, batches)


def _encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """-> each text's ids [n] as a document: [BOS when the tokenizer adds one] ids EOS."""
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(texts)
    else:
        encode = getattr(tokenizer, "encode_array", tokenizer.encode)
        encoded = [encode(text) for text in texts]
    head = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
    tail = np.array([tokenizer.eos_id], dtype=np.int64)
    return [
        np.concatenate([np.asarray(head, dtype=np.int64), np.asarray(ids, dtype=np.int64), tail])
        for ids in encoded
    ]

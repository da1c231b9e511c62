"""Where documents come from: Python's stdlib sources, text and JSONL files, and a synthetic Markov chain.

Readers yield `(name, text)` documents lazily in a deterministic (sorted) order; `documents_to_tokens`
concatenates them into one token stream with an EOS after every document.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from automoe.data.tokenizer import Tokenizer

# Directories under the stdlib root that hold third-party code or caches, never the standard library.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library (exists on every Python install)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _sorted_walk(root: Path, suffix: str) -> Iterator[Path]:
    """Files under `root` ending in `suffix`, lazily, in order of their relative path string."""
    with os.scandir(root) as it:
        entries = [e for e in it if e.name not in STDLIB_EXCLUDED_DIRS]
    # A directory sorts as "name/" so the walk order equals sorting the full relative paths.
    entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _sorted_walk(Path(entry.path), suffix)
        elif entry.name.endswith(suffix) and entry.is_file():
            yield Path(entry.path)


def iter_stdlib_documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Every `*.py` file of the standard library (site-packages excluded), one document per file."""
    root = root or stdlib_root()
    for path in _sorted_walk(root, ".py"):
        yield path.relative_to(root).as_posix(), path.read_bytes().decode("utf-8", errors="replace")


def list_files(path: Path, file_glob: str) -> list[Path]:
    """`path` itself when it is a file, else every file under it matching `file_glob`, sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob(file_glob) if p.is_file())


def iter_text_documents(files: Iterable[Path]) -> Iterator[tuple[str, str]]:
    """One document per text file (UTF-8; invalid bytes become U+FFFD)."""
    for path in files:
        yield str(path), path.read_bytes().decode("utf-8", errors="replace")


def iter_jsonl_documents(files: Iterable[Path], *, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """One document per non-blank JSONL line: the string under `text_field` of each JSON object."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{where}: no string field DataConfig.text_field={text_field!r}")
                yield where, record[text_field]


def cap_bytes(docs: Iterable[tuple[str, str]], max_bytes: int | None) -> Iterator[tuple[str, str]]:
    """Pass documents through until `max_bytes` UTF-8 bytes; the last one is cut at a character boundary."""
    total = 0
    for name, text in docs:
        if max_bytes is None:
            yield name, text
            continue
        data = text.encode("utf-8")
        if total + len(data) >= max_bytes:
            yield name, data[: max_bytes - total].decode("utf-8", errors="ignore")
            return
        total += len(data)
        yield name, text


def documents_to_tokens(docs: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """-> int64 token stream [N]: each document's ids followed by `tokenizer.eos_id`."""
    encode = getattr(tokenizer, "encode_array", tokenizer.encode)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    parts: list[np.ndarray] = []
    for text in docs:
        parts.append(np.asarray(encode(text), dtype=np.int64))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def synthetic_tokens(
    num_tokens: int, *, num_content_ids: int, branching: int, doc_len: int, eos_id: int, seed: int
) -> np.ndarray:
    """A learnable token stream [num_tokens]: documents of `doc_len` ids from a sparse Markov chain + EOS.

    Every id v has `branching` successors fixed by `seed`; each step picks one uniformly, so a bigram
    model reaches a loss of at most ln(branching) nats while a uniform guess costs ln(vocab).
    """
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, num_content_ids, size=(num_content_ids, branching))
    num_docs = -(-num_tokens // (doc_len + 1))
    docs = np.empty((num_docs, doc_len + 1), dtype=np.int64)
    docs[:, 0] = rng.integers(0, num_content_ids, size=num_docs)
    choices = rng.integers(0, branching, size=(doc_len - 1, num_docs))
    for t in range(1, doc_len):  # one vectorized step over all documents at a time
        docs[:, t] = successors[docs[:, t - 1], choices[t - 1]]
    docs[:, doc_len] = eos_id
    return docs.reshape(-1)[:num_tokens]

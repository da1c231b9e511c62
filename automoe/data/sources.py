"""Where documents come from: Python's stdlib sources, text and JSONL files, a Hugging Face `datasets` dataset
from local files, and a synthetic Markov chain.

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


# data files `datasets.load_dataset` reads with a packaged builder (no script, no download), by suffix
DATASET_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


def iter_datasets_documents(
    path: str | Path, *, text_field: str = "text", split: str = "train", streaming: bool = False
) -> Iterator[tuple[str, str]]:
    """One document per record of a Hugging Face `datasets` dataset read from local files only: a directory
    written by `save_to_disk` (a `DatasetDict` gives `split`), or data files (json/jsonl/parquet/csv/txt/arrow;
    a directory of them) read with the matching packaged builder. `streaming` reads record by record (for
    datasets larger than memory or disk cache). The text is the string column `text_field`."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "source 'datasets' needs the Hugging Face datasets library: pip install datasets"
        ) from None
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset {str(path)!r} does not exist (local files or a save_to_disk directory)")
    if path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    ):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {str(path)!r} has splits {list(ds)}, not split={split!r}")
            ds = ds[split]
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        files = [p for p in list_files(path, "*") if p.suffix in DATASET_BUILDERS]
        builders = {DATASET_BUILDERS[p.suffix] for p in files}
        if len(builders) != 1:
            raise ValueError(
                f"dataset {str(path)!r}: expected data files of one kind ({sorted(DATASET_BUILDERS)}), found "
                f"{sorted(builders) or 'none'}"
            )
        ds = datasets.load_dataset(
            builders.pop(), data_files=[str(p) for p in files], split="train", streaming=streaming
        )
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"dataset {str(path)!r} has columns {columns}, no text field {text_field!r}")
    for index, record in enumerate(ds):
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"dataset {str(path)!r} record {index}: {text_field!r} is not a string")
        yield f"{path}[{index}]", text


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
    """-> int64 token stream [N]: each document's ids followed by `tokenizer.eos_id` (and preceded by BOS when
    the tokenizer's `add_bos`); a tokenizer with `encode_batch` encodes a list of documents at once."""
    texts = list(docs)
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(texts)
    else:
        encode = getattr(tokenizer, "encode_array", tokenizer.encode)
        encoded = [encode(text) for text in texts]
    bos = np.array([tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else [], dtype=np.int64)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    parts: list[np.ndarray] = []
    for ids in encoded:
        parts += [bos, np.asarray(ids, dtype=np.int64), eos]
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

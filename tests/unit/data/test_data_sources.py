"""Corpora: stdlib (deterministic, capped), text and JSONL files, the synthetic Markov chain, the split."""

import json
import math
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from automoe.config.data import DataConfig
from automoe.data import ByteTokenizer, build_datasets
from automoe.data.sources import _sorted_walk, cap_bytes, synthetic_tokens

EOS = ByteTokenizer().eos_id


def _docs_of(tokens: np.ndarray) -> list[bytes]:
    """Split an EOS-separated byte-token stream back into documents (the last one may be unterminated)."""
    ends = np.flatnonzero(tokens == EOS)
    starts = np.concatenate([[0], ends + 1])
    return [tokens[s:e].astype(np.uint8).tobytes() for s, e in zip(starts, ends)]


def test_sorted_walk_equals_sorted_relative_paths(tmp_path):
    names = [
        "a.py",
        "a/b.py",
        "a_b.py",
        "_x.py",
        "a/z/y.py",
        "ab/c.py",
        "B.py",
        "site-packages/s.py",
        "c.txt",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    expected = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py"))
    expected.remove("site-packages/s.py")
    assert [p.relative_to(tmp_path).as_posix() for p in _sorted_walk(tmp_path, ".py")] == expected


def _stdlib_py_files(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        found += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    return found


def test_stdlib_corpus_is_deterministic_and_starts_with_the_first_stdlib_file():
    cfg = DataConfig(
        source="stdlib", max_bytes=200_000, seq_len=64, val_fraction=0.0, shuffle_documents=False
    )
    train_a, val = build_datasets(cfg)
    train_b, _ = build_datasets(cfg)
    assert val is None
    np.testing.assert_array_equal(train_a.tokens, train_b.tokens)
    root = Path(sysconfig.get_paths()["stdlib"])
    first = min(_stdlib_py_files(root))
    docs = _docs_of(train_a.tokens)
    assert docs[0] == (root / first).read_bytes()
    content = int((train_a.tokens != EOS).sum())
    assert 200_000 - 3 <= content <= 200_000  # capped, the last file cut at a character boundary
    assert train_a.vocab_size == 259 and len(train_a) == (train_a.num_tokens - 1) // 64


def test_stdlib_document_shuffle_and_val_tail():
    base = dict(source="stdlib", max_bytes=300_000, seq_len=32, val_fraction=0.1)
    ordered = np.concatenate([d.tokens for d in build_datasets(DataConfig(**base, shuffle_documents=False))])
    train, val = build_datasets(DataConfig(**base, seed=1))
    shuffled = np.concatenate([train.tokens, val.tokens])
    assert val.num_tokens == round(shuffled.size * 0.1)
    assert sorted(_docs_of(ordered)) == sorted(_docs_of(shuffled))  # same documents ...
    assert _docs_of(ordered) != _docs_of(shuffled)  # ... in another order


def test_text_directory_reads_matching_files_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file ünïcode")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "skip.md").write_text("not read by default")
    cfg = DataConfig(source="text", path=str(tmp_path), seq_len=4, val_fraction=0.0, shuffle_documents=False)
    train, _ = build_datasets(cfg)
    assert _docs_of(train.tokens) == ["first file ünïcode".encode(), b"second file", b"third"]
    md, _ = build_datasets(
        DataConfig(source="text", path=str(tmp_path), file_glob="*.md", seq_len=4, val_fraction=0)
    )
    assert _docs_of(md.tokens) == [b"not read by default"]


def test_jsonl_with_custom_field(tmp_path):
    rows = [{"body": f"document {i} é", "id": i} for i in range(20)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = DataConfig(
        source="jsonl",
        path=str(path),
        text_field="body",
        seq_len=8,
        val_fraction=0.0,
        shuffle_documents=False,
    )
    train, _ = build_datasets(cfg)
    assert _docs_of(train.tokens) == [r["body"].encode() for r in rows]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "ok"}\n{"body": "x"}', r"data.jsonl:2: no string field DataConfig.text_field='text'"),
        ('{"text": 3}', r"data.jsonl:1: no string field"),
        ('["text"]', r"data.jsonl:1: no string field"),
        ('{"text": "ok"}\n{broken', r"data.jsonl:2: invalid JSON"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, match):
    (tmp_path / "data.jsonl").write_text(line)
    with pytest.raises(ValueError, match=match):
        build_datasets(DataConfig(source="jsonl", path=str(tmp_path / "data.jsonl"), seq_len=1))


def test_cap_bytes_cuts_at_a_character_boundary():
    docs = [("a", "xx"), ("b", "é日"), ("c", "never")]  # "é日" is 2 + 3 bytes
    assert list(cap_bytes(docs, 5)) == [("a", "xx"), ("b", "é")]
    assert list(cap_bytes(docs, 7)) == [("a", "xx"), ("b", "é日")]
    assert list(cap_bytes(docs, None)) == docs


def test_synthetic_chain_is_seeded_and_learnable():
    kw = dict(num_content_ids=64, branching=3, doc_len=100, eos_id=65)
    a = synthetic_tokens(20_000, seed=0, **kw)
    np.testing.assert_array_equal(a, synthetic_tokens(20_000, seed=0, **kw))
    assert not np.array_equal(a, synthetic_tokens(20_000, seed=1, **kw))
    assert a.shape == (20_000,) and a.max() <= 65
    assert np.all(a[100::101] == 65) and (a == 65).sum() == len(a[100::101])  # one EOS after each document
    # Independent check of the structure: every id is followed by at most `branching` distinct ids,
    # so the empirical bigram entropy is at most ln(3), far below the uniform ln(64).
    prev, nxt = a[:-1], a[1:]
    keep = (prev != 65) & (nxt != 65)
    pairs = prev[keep] * 1000 + nxt[keep]
    uniq, counts = np.unique(pairs, return_counts=True)
    successors = np.bincount(uniq // 1000, minlength=64)
    assert successors.max() <= 3 and successors.min() >= 1
    p_pair = counts / counts.sum()
    p_prev = np.bincount(uniq // 1000, weights=counts, minlength=64)[uniq // 1000] / counts.sum()
    cond_entropy = -(p_pair * np.log(p_pair / p_prev)).sum()
    assert cond_entropy <= math.log(3) + 1e-9 and cond_entropy < 0.5 * math.log(64)


def test_synthetic_dataset_has_its_own_vocab():
    cfg = DataConfig(source="synthetic", synthetic_num_tokens=5000, synthetic_vocab_size=1000, seq_len=16)
    train, val = build_datasets(cfg)
    assert train.vocab_size == 1003 and train.eos_id == 1001 and train.pad_id == 1002
    assert train.num_tokens + val.num_tokens == 5000 and val.num_tokens == 250
    assert int(train.tokens.max()) < 1003

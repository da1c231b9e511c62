"""Memmap token files: `python -m automoe.prepare_data` round trip, the sidecar, dtype choice, and broken files."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from automoe.config.data import DataConfig
from automoe.data import ByteTokenizer, TokenFileWriter, build_datasets, read_token_file


@pytest.fixture(scope="module")
def prepare_data():
    """The command's module: `main(argv)` and the `prepare_token_file` it calls."""
    return importlib.import_module("automoe.prepare_data")


def expected_stream(texts: list[str]) -> list[int]:
    eos = ByteTokenizer().eos_id
    return [i for t in texts for i in [*t.encode("utf-8"), eos]]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t, "n": len(t)}) + "\n" for t in texts))


TEXTS = [f"doc {i}: " + "héllo wörld " * (i % 5) for i in range(40)]


def test_jsonl_round_trip_through_prepare_data(tmp_path, prepare_data):
    write_jsonl(tmp_path / "in.jsonl", TEXTS)
    out = tmp_path / "tok" / "train.bin"
    meta = prepare_data.prepare_token_file("jsonl", str(tmp_path / "in.jsonl"), out)["train"]
    tokens, read_meta = read_token_file(out)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.dtype("<u2")
    assert tokens.tolist() == expected_stream(TEXTS)
    assert read_meta == meta and meta["vocab_size"] == 259 and meta["eos_id"] == 257
    assert out.stat().st_size == 2 * len(expected_stream(TEXTS))

    cfg = DataConfig(source="tokens", path=str(out), seq_len=16, val_fraction=0.1)
    train, val = build_datasets(cfg)
    stream = expected_stream(TEXTS)
    assert np.concatenate([train.tokens, val.tokens]).tolist() == stream
    assert val.num_tokens == round(0.1 * len(stream)) and train.vocab_size == 259 and train.pad_id == 258


def test_val_split_files_partition_the_documents(tmp_path, prepare_data):
    (tmp_path / "docs").mkdir()
    for i, t in enumerate(TEXTS):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(t)
    out = tmp_path / "train.bin"
    res = prepare_data.prepare_token_file("text", str(tmp_path / "docs"), out, val_fraction=0.25, seed=1)
    val_out = tmp_path / "train_val.bin"
    assert res["val"]["num_tokens"] > 0 and res["train"]["num_tokens"] > 0

    train_docs, val_docs = (
        _split(read_token_file(out)[0].tolist()),
        _split(read_token_file(val_out)[0].tolist()),
    )
    assert sorted(train_docs + val_docs) == sorted(TEXTS)
    assert train_docs == [t for t in TEXTS if t in set(train_docs)]  # order within each file is preserved
    again = prepare_data.prepare_token_file(
        "text", str(tmp_path / "docs"), tmp_path / "b.bin", val_fraction=0.25, seed=1
    )
    assert again["val"]["num_tokens"] == res["val"]["num_tokens"]  # seeded split

    cfg = DataConfig(source="tokens", path=str(out), val_path=str(val_out), seq_len=8)
    train, val = build_datasets(cfg)
    assert val.tokens.tolist() == read_token_file(val_out)[0].tolist()
    assert train.num_tokens == res["train"]["num_tokens"]


def _split(raw: list[int]) -> list[str]:
    eos, docs, cur = ByteTokenizer().eos_id, [], []
    for i in raw:
        if i == eos:
            docs.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(i)
    return docs


def test_cli_main_with_stdlib(tmp_path, prepare_data):
    out = tmp_path / "std.bin"
    prepare_data.main(["--source", "stdlib", "--output", str(out), "--max-bytes", "5000"])
    tokens, meta = read_token_file(out)
    assert meta["num_tokens"] == len(tokens) and 5000 - 3 <= int((tokens != 257).sum()) <= 5000


def test_large_vocab_uses_uint32(tmp_path):
    ids = np.array([0, 70_000, 99_999, 5], dtype=np.int64)
    with TokenFileWriter(tmp_path / "big.bin", vocab_size=100_000, eos_id=99_999) as writer:
        writer.write(ids[:2])
        writer.write(ids[2:].tolist())
    tokens, meta = read_token_file(tmp_path / "big.bin")
    assert meta["dtype"] == "uint32" and tokens.tolist() == ids.tolist()
    # the sidecar's vocabulary is the dataset's (whether it fits the model is checked at start-up:
    # automoe.data.tokenizer_check)
    train, _ = build_datasets(
        DataConfig(source="tokens", path=str(tmp_path / "big.bin"), seq_len=2, val_fraction=0)
    )
    assert train.vocab_size == 100_000 and train.pad_id == 99_999  # no pad id written: EOS pads


def test_writer_rejects_out_of_range_ids_and_leaves_no_sidecar_on_error(tmp_path):
    path = tmp_path / "x.bin"
    with (
        pytest.raises(ValueError, match="vocab_size=259"),
        TokenFileWriter(path, vocab_size=259, eos_id=257) as w,
    ):
        w.write([1, 2, 259])
    assert path.exists() and not path.with_suffix(".json").exists()
    with pytest.raises(ValueError, match="sidecar x.json is missing"):
        read_token_file(path)


def test_broken_token_files(tmp_path):
    path = tmp_path / "t.bin"
    with TokenFileWriter(path, vocab_size=259, eos_id=257) as w:
        w.write(np.arange(10))
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"DataConfig.path=.*holds 21 bytes, sidecar says 10 x 2"):
        read_token_file(path)
    with TokenFileWriter(path, vocab_size=259, eos_id=257):
        pass
    with pytest.raises(ValueError, match="token file is empty"):
        read_token_file(path)
    meta = json.loads(path.with_suffix(".json").read_text()) | {"dtype": "float32"}
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dtype='float32'"):
        read_token_file(path)
    with pytest.raises(ValueError, match="DataConfig.path=.*missing.bin' does not exist"):
        build_datasets(DataConfig(source="tokens", path=str(tmp_path / "missing.bin")))


def test_prepare_data_errors(tmp_path, prepare_data):
    with pytest.raises(ValueError, match="--input='nope' does not exist"):
        prepare_data.prepare_token_file("text", "nope", tmp_path / "o.bin")
    with pytest.raises(ValueError, match=r"--val-fraction=1.0 must be in \[0, 1\)"):
        prepare_data.prepare_token_file("stdlib", None, tmp_path / "o.bin", val_fraction=1.0)
    with pytest.raises(ValueError, match="--source='csv'"):
        prepare_data.prepare_token_file("csv", None, tmp_path / "o.bin")
    with pytest.raises(ValueError, match=r"holds no files matching '\*.jsonl'"):
        prepare_data.prepare_token_file("jsonl", str(tmp_path), tmp_path / "o.bin")

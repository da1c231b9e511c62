"""Hugging Face tokenizers from local files (a tokenizer.json, a transformers directory; a hub id only from the
offline cache), token files that record their tokenizer, the `datasets` source, and the start-up check that the
data's tokenizer is the model's."""

import json

import numpy as np
import pytest

from automoe.config.data import DataConfig
from automoe.config.job import HFConfig, JobConfig
from automoe.config.model import ModelConfig
from automoe.data import build_datasets, read_token_file
from automoe.data.prepare import prepare_token_file
from automoe.data.tokenizer import HFTokenizer, load_tokenizer
from automoe.data.tokenizer_check import check_data_tokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXTS = [f"def f{i}(x):\n    return x * {i}  # hello world\n" for i in range(40)]


def make_tokenizer(directory, *, vocab_size=300, bos=False, seed_text="hello world def return"):
    """A small byte-level BPE trained here (no download), saved as tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([seed_text, *TEXTS], trainer)
    if bos:  # Llama style: the tokenizer's own encoding starts with BOS
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_tokenizer_json_and_transformers_dir_encode_alike(tmp_path):
    tf = pytest.importorskip("transformers")
    bare = HFTokenizer(make_tokenizer(tmp_path / "bare") / "tokenizer.json")
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "bare" / "tokenizer.json"), eos_token="<s>"
    )
    fast.save_pretrained(tmp_path / "hf")
    full = load_tokenizer(str(tmp_path / "hf"))
    assert (bare.eos_id, bare.add_bos) == (0, False)  # <|endoftext|> found by name
    assert full.eos_id == 1  # tokenizer_config.json names <s> as EOS
    assert bare.encode_batch(TEXTS[:3]) == full.encode_batch(TEXTS[:3])
    assert bare.decode(bare.encode(TEXTS[0])) == TEXTS[0]
    assert bare.fingerprint() == full.fingerprint() and bare.vocab_size == full.vocab_size


def test_a_hub_id_is_read_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"--tokenizer='someone/tiny-tok' is not a local path.*local Hugging Face"
    ):
        load_tokenizer("someone/tiny-tok", key="--tokenizer")
    with pytest.raises(ValueError, match=r"data.tokenizer='\./nowhere' does not exist"):
        load_tokenizer("./nowhere", key="data.tokenizer")


def test_prepared_file_records_its_tokenizer_and_brackets_documents(tmp_path):
    tok = HFTokenizer(make_tokenizer(tmp_path / "tok", bos=True))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    meta = prepare_token_file("jsonl", str(corpus), tmp_path / "out" / "train.bin", tokenizer=tok)["train"]
    ids, saved = read_token_file(tmp_path / "out" / "train.bin")
    assert saved == meta
    assert meta["tokenizer"] == "tok" and meta["tokenizer_path"] == str((tmp_path / "tok").resolve())
    assert meta["tokenizer_fingerprint"] == tok.fingerprint() and meta["add_bos"] is True
    expected = np.concatenate([[tok.bos_id, *tok.encode(t), tok.eos_id] for t in TEXTS])
    assert ids.tolist() == expected.tolist()


def test_datasets_source_reads_saved_datasets_and_data_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": TEXTS[:5]}),
            "test": datasets.Dataset.from_dict({"content": TEXTS[5:7]}),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    for i in range(2):
        (tmp_path / "files" / f"{i}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[3 * i : 3 * i + 3])
        )
    from automoe.data.sources import iter_datasets_documents

    saved = [t for _, t in iter_datasets_documents(tmp_path / "saved", text_field="content", split="test")]
    streamed = [
        t for _, t in iter_datasets_documents(tmp_path / "saved", text_field="content", streaming=True)
    ]
    files = [t for _, t in iter_datasets_documents(tmp_path / "files")]
    assert saved == TEXTS[5:7] and streamed == TEXTS[:5] and files == TEXTS[:6]
    with pytest.raises(ValueError, match="no text field 'text'"):
        next(iter_datasets_documents(tmp_path / "saved"))
    cfg = DataConfig(source="datasets", path=str(tmp_path / "files"), seq_len=8, val_fraction=0.0)
    train, _ = build_datasets(cfg)
    assert train.vocab_size == 259 and train.num_tokens == sum(len(t.encode()) + 1 for t in TEXTS[:6])


def _job(tmp_path, data: DataConfig, *, vocab: int, hf_dir=None) -> JobConfig:
    model = ModelConfig(vocab_size=vocab, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_inter_dim=32)
    return JobConfig(output_dir=str(tmp_path / "run"), model=model, data=data, hf=HFConfig(init_from=hf_dir))


def test_training_refuses_data_of_another_tokenizer_naming_both(tmp_path):
    mine = HFTokenizer(make_tokenizer(tmp_path / "mine"))
    other = make_tokenizer(tmp_path / "other", vocab_size=290, seed_text="entirely different words here")
    hf_dir = tmp_path / "hf_model"
    make_tokenizer(hf_dir)  # the model's directory holds the same tokenizer as `mine`
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXTS[0])
    path = tmp_path / "tok" / "train.bin"
    prepare_token_file("text", str(corpus), path, tokenizer=HFTokenizer(other))
    tokens = DataConfig(source="tokens", path=str(path), seq_len=8, val_fraction=0.0)
    with pytest.raises(
        ValueError, match=r"is in tokenizer 'other' .*but hf.init_from=.* is tokenizer 'hf_model'"
    ):
        check_data_tokenizer(_job(tmp_path, tokens, vocab=300, hf_dir=str(hf_dir)))
    prepare_token_file("text", str(corpus), path, tokenizer=mine)
    check_data_tokenizer(
        _job(tmp_path, tokens, vocab=300, hf_dir=str(hf_dir))
    )  # the same tokenizer: accepted
    text = DataConfig(source="text", path=str(corpus), seq_len=8, val_fraction=0.0)
    check_data_tokenizer(_job(tmp_path, text, vocab=300, hf_dir=str(hf_dir)))  # tokenized with the model's
    with pytest.raises(ValueError, match=r"more ids than the model's model.vocab_size=200"):
        check_data_tokenizer(_job(tmp_path, tokens, vocab=200))


def test_byte_data_for_an_hf_model_without_a_tokenizer_is_refused(tmp_path):
    hf_dir = tmp_path / "hf_model"
    hf_dir.mkdir()
    stdlib = DataConfig(source="stdlib", seq_len=8)
    with pytest.raises(
        ValueError, match=r"the byte tokenizer \(vocab 259\), but hf.init_from=.*vocab_size=97"
    ):
        check_data_tokenizer(_job(tmp_path, stdlib, vocab=97, hf_dir=str(hf_dir)))
    check_data_tokenizer(
        _job(tmp_path, DataConfig(source="synthetic", synthetic_vocab_size=64), vocab=97, hf_dir=str(hf_dir))
    )


def test_worker_processes_write_the_same_file(tmp_path, monkeypatch):
    import automoe.data.prepare as prepare

    monkeypatch.setattr(prepare, "BATCH_DOCUMENTS", 7)  # several batches over the 40 documents
    tok = HFTokenizer(make_tokenizer(tmp_path / "tok"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for workers in (1, 2):
        prepare_token_file(
            "jsonl",
            str(corpus),
            tmp_path / f"w{workers}.bin",
            tokenizer=tok,
            val_fraction=0.2,
            num_workers=workers,
        )
    for name in ("w{}.bin", "w{}_val.bin"):
        assert (tmp_path / name.format(1)).read_bytes() == (tmp_path / name.format(2)).read_bytes()

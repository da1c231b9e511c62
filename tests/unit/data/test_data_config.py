"""DataConfig validation, ineffective-setting warnings, structured-config use, and build_datasets errors."""

import warnings

import pytest
from omegaconf import OmegaConf

from automoe.config.data import DataConfig
from automoe.data import build_datasets


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="parquet"), r"DataConfig.source='parquet' is not one of"),
        (dict(source="text"), r"DataConfig.path=None is required for source='text'"),
        (dict(source="jsonl", path=""), r"DataConfig.path='' is required for source='jsonl'"),
        (dict(source="tokens"), r"DataConfig.path=None is required for source='tokens'"),
        (dict(seq_len=0), r"DataConfig.seq_len=0 must be >= 1"),
        (dict(val_fraction=1.0), r"DataConfig.val_fraction=1.0 must be in \[0, 1\)"),
        (dict(val_fraction=-0.1), r"DataConfig.val_fraction=-0.1"),
        (dict(max_bytes=0), r"DataConfig.max_bytes=0 must be >= 1 or None"),
        (dict(seed=-1), r"DataConfig.seed=-1 must be >= 0"),
        (dict(text_field=""), r"DataConfig.text_field=''"),
        (dict(synthetic_num_tokens=0), r"DataConfig.synthetic_num_tokens=0 must be >= 1"),
        (dict(synthetic_vocab_size=0), r"DataConfig.synthetic_vocab_size=0 must be >= 1"),
        (dict(synthetic_branching=0), r"DataConfig.synthetic_branching=0 must be >= 1"),
        (dict(synthetic_doc_len=0), r"DataConfig.synthetic_doc_len=0 must be >= 1"),
        (dict(synthetic_vocab_size=4, synthetic_branching=5), r"DataConfig.synthetic_branching=5 exceeds"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="stdlib", path="x.txt"), "path/val_path have no effect with source='stdlib'"),
        (dict(source="synthetic", val_path="v"), "path/val_path have no effect with source='synthetic'"),
        (dict(source="text", path="x", text_field="body"), "text_field='body' has no effect"),
        (dict(source="tokens", path="x", file_glob="*.bin"), r"file_glob='\*.bin' has no effect"),
    ],
)
def test_ineffective_settings_warn(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        DataConfig(**kwargs)


def test_defaults_do_not_warn_and_work_as_structured_config():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataConfig()
        DataConfig(source="jsonl", path="x.jsonl", text_field="body", val_path="v.jsonl")
    merged = OmegaConf.merge(
        OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(["source=synthetic", "seq_len=64"])
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.source == "synthetic" and cfg.seq_len == 64


def test_build_errors(tmp_path):
    with pytest.raises(ValueError, match=r"DataConfig.path='.*nowhere' does not exist"):
        build_datasets(DataConfig(source="text", path=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"DataConfig.val_path='.*nowhere' does not exist"):
        (tmp_path / "a.txt").write_text("some text " * 50)
        build_datasets(
            DataConfig(source="text", path=str(tmp_path / "a.txt"), val_path=str(tmp_path / "nowhere"))
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no files matching file_glob='\*.txt'"):
        build_datasets(DataConfig(source="text", path=str(tmp_path / "empty")))
    (tmp_path / "empty" / "e.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match=r"DataConfig.path=.*empty' holds no text"):
        build_datasets(DataConfig(source="jsonl", path=str(tmp_path / "empty")))
    (tmp_path / "short.txt").write_text("0123456789")  # 11 tokens with the EOS
    with pytest.raises(ValueError, match=r"DataConfig.seq_len=20 is too long for train"):
        build_datasets(
            DataConfig(source="text", path=str(tmp_path / "short.txt"), seq_len=20, val_fraction=0)
        )
    with pytest.raises(
        ValueError, match=r"DataConfig.val_fraction=0.05 of 11 tokens leaves 1 for validation"
    ):
        build_datasets(DataConfig(source="text", path=str(tmp_path / "short.txt"), seq_len=2))
    train, val = build_datasets(
        DataConfig(source="text", path=str(tmp_path / "short.txt"), seq_len=2, val_fraction=0.3)
    )
    assert (train.num_tokens, val.num_tokens) == (8, 3)

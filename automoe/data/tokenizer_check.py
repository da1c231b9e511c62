"""Which tokenizer a run's data is in, and the start-up check that it is the model's (before any collective).

The text sources are tokenized at start-up with `data.tokenizer` (default: the byte tokenizer, or the tokenizer of
`hf.init_from` when that directory has one); a `tokens` file carries its tokenizer in its sidecar
(`automoe.data.tokenizer.tokenizer_info`). A fine-tune must read ids of its checkpoint's tokenizer: training a
151,936-token model on byte ids runs, and learns nothing useful, so it is refused with both tokenizers named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automoe.config.data import TEXT_SOURCES
from automoe.data.dataset import check_exists
from automoe.data.token_file import sidecar_path
from automoe.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_info

if TYPE_CHECKING:
    from automoe.config.job import JobConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def data_tokenizer_spec(cfg: JobConfig) -> str | None:
    """`data.tokenizer`, else `hf.init_from` when it holds tokenizer files, else None (the byte tokenizer)."""
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    if cfg.hf.init_from is not None and has_tokenizer(cfg.hf.init_from):
        return cfg.hf.init_from
    return None


def data_tokenizer(cfg: JobConfig) -> Tokenizer:
    """The tokenizer the text sources of `cfg.data` are encoded with."""
    spec = data_tokenizer_spec(cfg)
    key = "data.tokenizer" if cfg.data.tokenizer is not None else "hf.init_from"
    return load_tokenizer(spec, key=key)


def describe(info: dict[str, Any]) -> str:
    """One phrase naming a tokenizer record, e.g. `HF tokenizer 'qwen3' (/data/qwen3, vocab 151669)`."""
    if _is_byte(info):
        return f"the byte tokenizer (vocab {info['vocab_size']})"
    where = f"{info['tokenizer_path']}, " if info.get("tokenizer_path") else ""
    return f"tokenizer {info.get('tokenizer')!r} ({where}vocab {info['vocab_size']})"


def _sidecar_info(path: str, field: str) -> dict[str, Any]:
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise ValueError(
            f"DataConfig.{field}={path!r}: sidecar {meta_path.name} is missing (unfinished write?)"
        )
    meta = json.loads(meta_path.read_text())
    meta["where"] = f"data.{field}={path!r}"
    return meta


def data_tokenizer_infos(cfg: JobConfig) -> list[dict[str, Any]]:
    """The tokenizer record of every data file the run reads (tokens: each sidecar; text: the tokenizer's)."""
    data = cfg.data
    if data.source == "tokens":
        return [_sidecar_info(p, f) for f, p in (("path", data.path), ("val_path", data.val_path)) if p]
    if data.source in TEXT_SOURCES:
        for field in ("path", "val_path"):  # a missing file is the first thing to say, before any vocabulary
            if getattr(data, field):
                check_exists(getattr(data, field), field)
        info = tokenizer_info(data_tokenizer(cfg))
        return [{**info, "where": f"data.source={data.source!r}"}]
    return []  # synthetic: ids without a tokenizer


def check_data_tokenizer(cfg: JobConfig) -> None:
    """ValueError, naming both tokenizers, when the data cannot be the model's: more ids than model.vocab_size,
    another tokenizer than `hf.init_from`'s (fingerprints differ) or than `data.tokenizer`, or byte ids for an HF
    model whose vocabulary is not the byte one."""
    model_vocab = cfg.model.vocab_size
    expected = None
    if cfg.data.tokenizer is not None and cfg.data.source == "tokens":
        expected = (tokenizer_info(data_tokenizer(cfg)), f"data.tokenizer={cfg.data.tokenizer!r}")
    elif cfg.hf.init_from is not None and has_tokenizer(cfg.hf.init_from):
        hf_info = tokenizer_info(load_tokenizer(str(cfg.hf.init_from), key="hf.init_from"))
        expected = (hf_info, f"hf.init_from={cfg.hf.init_from!r}")
    for info in data_tokenizer_infos(cfg):
        name = f"{info['where']} is in {describe(info)}"
        if expected is not None:
            want, key = expected
            same = (
                info.get("tokenizer_fingerprint") == want["tokenizer_fingerprint"]
                and info.get("eos_id") == want["eos_id"]
            )
            if not same:
                raise ValueError(
                    f"{name}, but {key} is {describe(want)}: they split text differently. Tokenize the data with "
                    f"the model's tokenizer: python -m automoe.prepare_data --tokenizer {want['tokenizer_path']} "
                    "... (or, for stdlib/text/jsonl/datasets sources, set data.tokenizer)"
                )
        elif cfg.hf.init_from is not None and _is_byte(info) and model_vocab != info["vocab_size"]:
            raise ValueError(
                f"{name}, but hf.init_from={cfg.hf.init_from!r} is a model of vocab_size={model_vocab} whose "
                "directory holds no tokenizer: byte ids mean nothing to it. Give its tokenizer as data.tokenizer "
                "(a directory / tokenizer.json / cached hub id), or prepare token files with "
                "python -m automoe.prepare_data --tokenizer ..."
            )
        if info["vocab_size"] > model_vocab:
            raise ValueError(
                f"{name}, more ids than the model's model.vocab_size={model_vocab}: tokenize the data with the "
                "model's tokenizer (python -m automoe.prepare_data --tokenizer ...) or size the model to it"
            )


def _is_byte(info: dict[str, Any]) -> bool:
    return info.get("tokenizer") in ("byte", "ByteTokenizer")

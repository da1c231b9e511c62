"""ByteTokenizer: UTF-8 round trip, id layout, special ids dropped on decode, bad ids rejected."""

import pytest

from automoe.data import ByteTokenizer

TEXTS = ["", "hello world", "naïve café — 日本語 🚀\n\ttabs", "def f(x):\n    return x ** 2\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_are_utf8_bytes(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_id_layout():
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    small = ByteTokenizer(10)
    assert (small.bos_id, small.eos_id, small.pad_id, small.vocab_size) == (10, 11, 12, 13)


def test_decode_drops_specials_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    ids = [tok.bos_id, *tok.encode("ab"), tok.eos_id, *tok.encode("c"), tok.pad_id]
    assert tok.decode(ids) == "abc"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character


@pytest.mark.parametrize("bad", [-1, 259, 10_000])
def test_decode_rejects_out_of_range_ids(bad):
    with pytest.raises(ValueError, match=str(bad)):
        ByteTokenizer().decode([65, bad])


def test_invalid_tokenizer_settings():
    with pytest.raises(ValueError, match="num_content_ids=0"):
        ByteTokenizer(0)
    with pytest.raises(ValueError, match="num_content_ids=10"):
        ByteTokenizer(10).encode("text")

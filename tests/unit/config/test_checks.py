"""The shared layout checks: each fact is written once and its message names the fields and values."""

import pytest

from automoe.config.checks import check_choice, check_experts_split, check_sequence_split


def test_experts_split_names_fields_and_layer():
    check_experts_split(8, 4)
    with pytest.raises(
        ValueError, match=r"model\.moe\.num_experts=6 is not divisible by parallel\.ep=4"
    ) as info:
        check_experts_split(6, 4, where="layers.1.moe")
    assert str(info.value).startswith("layers.1.moe: ")
    assert "num_experts % ep = 6 % 4" in str(info.value)


@pytest.mark.parametrize(
    ("seq_len", "cp", "zigzag", "match"),
    [
        (10, 4, False, r"data\.seq_len=10 is not divisible by parallel\.cp=4"),
        (12, 4, True, r"data\.seq_len=12 is not divisible by 2\*parallel\.cp = 8"),
        (9, 3, True, r"2\*parallel\.cp = 6"),
    ],
)
def test_sequence_split_names_fields(seq_len, cp, zigzag, match):
    with pytest.raises(ValueError, match=match):
        check_sequence_split(seq_len, cp, zigzag=zigzag)


def test_sequence_split_accepts_even_splits():
    check_sequence_split(12, 3)
    check_sequence_split(16, 4, zigzag=True)


def test_choice_names_the_field_and_the_options():
    check_choice("train.dtype", "float32", ("float32", "bfloat16"))
    with pytest.raises(ValueError, match=r"train\.dtype='float16' is not one of \['float32', 'bfloat16'\]"):
        check_choice("train.dtype", "float16", ("float32", "bfloat16"))

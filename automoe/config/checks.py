"""Checks the config dataclasses and the parallel code share, each written once: a choice among names and a
layout's divisibility facts.

Every check raises `ValueError` naming the config fields and their values.
"""

from __future__ import annotations

from collections.abc import Iterable


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """`value` is one of `choices`; `name` is the field as the user spells it (`train.dtype`, `MoEConfig.gate`)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def check_experts_split(num_experts: int, ep: int, *, where: str = "") -> None:
    """The routed experts split evenly over `ep` expert-parallel ranks. `where` prefixes the message (a layer)."""
    if num_experts % ep:
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}model.moe.num_experts={num_experts} is not divisible by parallel.ep={ep} "
            f"(num_experts % ep = {num_experts} % {ep} != 0): experts cannot be split evenly over the EP ranks"
        )


def check_sequence_split(seq_len: int, cp: int, *, zigzag: bool = False) -> None:
    """A sequence splits evenly over `cp` context-parallel ranks; `zigzag` (load balance) needs 2*cp chunks."""
    if zigzag and seq_len % (2 * cp):
        raise ValueError(
            f"data.seq_len={seq_len} is not divisible by 2*parallel.cp = {2 * cp} "
            "(zigzag CP chunks, parallel.cp_load_balance=True)"
        )
    if seq_len % cp:
        raise ValueError(f"data.seq_len={seq_len} is not divisible by parallel.cp={cp}")

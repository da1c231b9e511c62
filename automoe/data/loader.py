"""Stateful, deterministic, data-parallel-sharded batches: `StatefulLoader` (training) and `val_batches`.

The global batch of every optimizer step is a function of (seed, epoch, position) only: dp rank r of
dp_size takes the r-th contiguous slice of it and cuts that into micro-batches, so the union over
ranks and micro-batches is the same for every layout. No torch.distributed here: the caller passes
dp_rank/dp_size (context-parallel ranks of one sequence get the same dp_rank and split it themselves).

Shape suffixes: docs/architecture.md#shape-legend.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from automoe.data import documents
from automoe.data.dataset import TokenDataset

IGNORE_INDEX = -100  # label of positions that carry no loss (padding rows)
PAD_ROW = -1  # sample index standing for a padding row


def _check_layout(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """-> micro-batches per rank and step; raises ValueError naming the offending argument."""
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("micro_batch_size", micro_batch_size),
        ("dp_size", dp_size),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size={micro_batch_size} "
            f"x dp_size={dp_size} = {micro_batch_size * dp_size}"
        )
    return global_batch_size // (micro_batch_size * dp_size)


def make_micro_batches(
    dataset: TokenDataset, global_indices: np.ndarray, *, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[dict[str, Any]]:
    """This rank's micro-batches of one global batch of sample indices [G] (PAD_ROW = padding row).

    Each dict: `input_ids` int64 [B, S]; `labels` int64 [B, S] (inputs shifted by one, IGNORE_INDEX on
    padding rows); `num_tokens` (labels != IGNORE_INDEX here) and `global_num_tokens` (the same count over
    the whole global batch, all ranks): divide the summed loss by it to get the layout-free mean.
    With `dataset.document_masking` also `document_ids` int64 [B, S] (`documents.document_ids`; 0 on padding
    rows), `positions` int64 [B, S] (restarting at 0 in every document) and `num_documents` (1 + largest id).
    """
    S = dataset.seq_len
    global_num_tokens = int((global_indices != PAD_ROW).sum()) * S
    per_rank = len(global_indices) // dp_size
    local = global_indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    batches = []
    for start in range(0, per_rank, micro_batch_size):
        rows = local[start : start + micro_batch_size]
        valid = rows != PAD_ROW
        windows = np.full((len(rows), S + 1), dataset.pad_id, dtype=np.int64)  # (B, S+1)
        windows[valid] = dataset.windows(rows[valid])
        labels_BS = windows[:, 1:].copy()
        labels_BS[~valid] = IGNORE_INDEX
        batch = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
            "labels": torch.from_numpy(labels_BS),
            "num_tokens": int(valid.sum()) * S,
            "global_num_tokens": global_num_tokens,
        }
        if dataset.document_masking:
            batch.update(_documents(batch["input_ids"], torch.from_numpy(valid), dataset.eos_id))
        batches.append(batch)
    return batches


def _documents(input_ids_BS: torch.Tensor, valid_B: torch.Tensor, eos_id: int) -> dict[str, Any]:
    """The document fields of a micro-batch (see `make_micro_batches`); a padding row is one document."""
    ids_BS = documents.document_ids(input_ids_BS, eos_id).masked_fill(~valid_B[:, None], 0)
    return {
        "document_ids": ids_BS,
        "positions": documents.document_positions(ids_BS),
        "num_documents": documents.num_documents(ids_BS),
    }


class StatefulLoader:
    """Endless training batches: each `next_step()` is one optimizer step's micro-batches for this rank.

    Each epoch visits a seeded permutation (`np.random.default_rng([seed, epoch])`) of the samples in
    global batches of `global_batch_size`; the remainder (< one global batch) is dropped, the next
    epoch starts a fresh permutation. `state_dict()` is the same on every rank and independent of
    dp_size/micro_batch_size, so a run can resume on another layout and train on the same data.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_micro_batches = _check_layout(global_batch_size, micro_batch_size, dp_rank, dp_size)
        if global_batch_size > len(dataset):
            raise ValueError(
                f"global_batch_size={global_batch_size} exceeds the {len(dataset)} samples of {dataset.name} "
                f"(seq_len={dataset.seq_len}, {dataset.num_tokens} tokens)"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0  # epochs completed before the current one
        self.sample_offset = 0  # position in the current epoch's order, in samples
        self.step = 0  # optimizer steps served so far
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def next_step(self) -> list[dict[str, Any]]:
        """-> `num_micro_batches` dicts (see `make_micro_batches`) for the next optimizer step."""
        G = self.global_batch_size
        if self.sample_offset + G > len(self.dataset):
            self.epoch, self.sample_offset = self.epoch + 1, 0
        global_indices = self._epoch_order()[self.sample_offset : self.sample_offset + G]
        self.sample_offset += G
        self.step += 1
        return make_micro_batches(
            self.dataset,
            global_indices,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )

    def state_dict(self) -> dict[str, int]:
        """Position to resume from (plain ints; identical on every dp rank)."""
        return {
            "epoch": self.epoch,
            "sample_offset": self.sample_offset,
            "step": self.step,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where `state` was taken; the data, seed and shuffle must match."""
        for key, mine in (
            ("seed", self.seed),
            ("shuffle", int(self.shuffle)),
            ("num_samples", len(self.dataset)),
        ):
            if int(state[key]) != mine:
                raise ValueError(
                    f"loader state has {key}={int(state[key])}, this loader has {key}={mine}: "
                    "resuming on different data or order would not continue the same run"
                )
        self.epoch = int(state["epoch"])
        self.sample_offset = int(state["sample_offset"])
        self.step = int(state["step"])


def val_batches(
    dataset: TokenDataset,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_steps: int | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Every sample once, in order, as global batches sharded like `StatefulLoader.next_step`.

    The last global batch is filled with padding rows (labels all IGNORE_INDEX) so every rank runs the
    same number of micro-batches (collectives such as expert all-to-all need all ranks in every
    forward). `max_steps` caps the number of global batches.
    """
    _check_layout(global_batch_size, micro_batch_size, dp_rank, dp_size)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1 or None")
    num_steps = -(-len(dataset) // global_batch_size)
    if max_steps is not None:
        num_steps = min(num_steps, max_steps)
    for step in range(num_steps):
        indices = np.arange(step * global_batch_size, (step + 1) * global_batch_size)
        indices[indices >= len(dataset)] = PAD_ROW
        yield make_micro_batches(
            dataset, indices, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size
        )

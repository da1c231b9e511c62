"""StatefulLoader / val_batches: layout-free global batches, exact resume, epoch rollover, padding, errors.

The token stream is arange(...), so a window's first id divided by S names its sample index:
every assertion below is against that independent identity, not the loader's own bookkeeping.
"""

import itertools

import numpy as np
import pytest
import torch

from automoe.data import IGNORE_INDEX, StatefulLoader, TokenDataset, val_batches

S = 4


def make_dataset(num_samples: int, extra: int = 1) -> TokenDataset:
    tokens = np.arange(num_samples * S + extra, dtype=np.int64)
    return TokenDataset(tokens, seq_len=S, vocab_size=len(tokens) + 1, eos_id=len(tokens), pad_id=len(tokens))


def sample_ids(micro_batches) -> list[int]:
    """Sample index of every row of a list of micro-batches; checks inputs/labels are true windows."""
    ids = []
    for mb in micro_batches:
        x, y = mb["input_ids"], mb["labels"]
        assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == S
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            if row_y == [IGNORE_INDEX] * S:
                ids.append(-1)
                continue
            i = row_x[0] // S
            assert row_x == list(range(i * S, i * S + S)) and row_y == list(range(i * S + 1, i * S + S + 1))
            ids.append(i)
    return ids


def global_step(dataset, *, steps, global_batch_size, micro_batch_size, dp_size, seed=0, state=None):
    """Run one loader per dp rank for `steps` steps -> per step: rank-major, micro-batch-major sample ids."""
    loaders = [
        StatefulLoader(
            dataset,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            dp_rank=r,
            dp_size=dp_size,
            seed=seed,
        )
        for r in range(dp_size)
    ]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        per_rank = [loader.next_step() for loader in loaders]
        for loader, mbs in zip(loaders, per_rank):
            assert len(mbs) == loader.num_micro_batches == global_batch_size // (micro_batch_size * dp_size)
            assert all(mb["input_ids"].shape[0] == micro_batch_size for mb in mbs)
            assert all(mb["global_num_tokens"] == global_batch_size * S for mb in mbs)
        out.append([i for mbs in per_rank for i in sample_ids(mbs)])
    return out, loaders[0].state_dict()


LAYOUTS = [(dp, mb) for dp in (1, 2, 4) for mb in (1, 2, 4) if 8 % (dp * mb) == 0]


@pytest.mark.parametrize("dp_size, micro_batch_size", LAYOUTS, ids=[f"dp{d}-mb{m}" for d, m in LAYOUTS])
def test_union_over_ranks_equals_the_dp1_batch(dp_size, micro_batch_size):
    dataset = make_dataset(37)
    reference, _ = global_step(dataset, steps=10, global_batch_size=8, micro_batch_size=8, dp_size=1)
    got, _ = global_step(
        dataset, steps=10, global_batch_size=8, micro_batch_size=micro_batch_size, dp_size=dp_size
    )
    assert got == reference  # same samples, even in the same rank-major order
    for rank in range(dp_size):  # each rank's slice is disjoint from the others
        per = 8 // dp_size
        assert len(set(got[0][rank * per : (rank + 1) * per]) & set(got[0][: rank * per])) == 0


def test_epochs_are_seeded_permutations_and_roll_over():
    dataset = make_dataset(10)  # global batch 4 -> 2 steps per epoch, 2 samples dropped per epoch
    loader = StatefulLoader(dataset, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3)
    assert loader.steps_per_epoch == 2
    epochs = []
    for epoch in range(4):
        ids = sample_ids(loader.next_step()) + sample_ids(loader.next_step())
        assert loader.epoch == epoch
        assert len(set(ids)) == 8 and set(ids) <= set(range(10))  # no repeat within an epoch
        epochs.append(ids)
    assert len({tuple(e) for e in epochs}) == 4  # a fresh order each epoch
    assert loader.state_dict()["step"] == 8
    other_seed, _ = global_step(dataset, steps=2, global_batch_size=4, micro_batch_size=4, dp_size=1, seed=4)
    assert other_seed[0] + other_seed[1] != epochs[0]


def test_no_shuffle_streams_in_order():
    dataset = make_dataset(9)
    loader = StatefulLoader(
        dataset, global_batch_size=3, micro_batch_size=1, dp_rank=0, dp_size=1, shuffle=False
    )
    got = [sample_ids(loader.next_step()) for _ in range(4)]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


@pytest.mark.parametrize("split_at", [1, 3, 4, 7])
@pytest.mark.parametrize("resume_dp, resume_mb", [(1, 2), (2, 2), (4, 1)], ids=["dp1", "dp2", "dp4"])
def test_resume_equals_uninterrupted(split_at, resume_dp, resume_mb):
    dataset = make_dataset(17)  # 4 steps per epoch at global batch 4: split points cross epoch ends
    uninterrupted, _ = global_step(
        dataset, steps=12, global_batch_size=4, micro_batch_size=2, dp_size=2, seed=5
    )
    first, state = global_step(
        dataset, steps=split_at, global_batch_size=4, micro_batch_size=2, dp_size=2, seed=5
    )
    assert state["step"] == split_at
    rest, _ = global_step(
        dataset,
        steps=12 - split_at,
        global_batch_size=4,
        micro_batch_size=resume_mb,
        dp_size=resume_dp,
        seed=5,
        state=state,
    )
    assert first + rest == uninterrupted


def test_state_is_the_same_on_every_rank_and_plain_ints():
    dataset = make_dataset(20)
    states = []
    for rank in range(2):
        loader = StatefulLoader(dataset, global_batch_size=4, micro_batch_size=1, dp_rank=rank, dp_size=2)
        for _ in range(3):
            loader.next_step()
        states.append(loader.state_dict())
    assert states[0] == states[1]
    assert all(type(v) is int for v in states[0].values())


@pytest.mark.parametrize("key, value", [("seed", 9), ("shuffle", 0), ("num_samples", 99)])
def test_resume_on_other_data_or_seed_is_refused(key, value):
    loader = StatefulLoader(make_dataset(20), global_batch_size=4, micro_batch_size=1, dp_rank=0, dp_size=1)
    state = loader.state_dict() | {key: value}
    with pytest.raises(ValueError, match=f"{key}={value}"):
        loader.load_state_dict(state)


@pytest.mark.parametrize("dp_size, micro_batch_size", [(1, 4), (2, 1), (2, 2), (4, 1)])
def test_val_batches_cover_every_sample_once_with_padding(dp_size, micro_batch_size):
    dataset = make_dataset(10, extra=3)  # 10 samples; global batch 4 -> 3 steps, the last one half padding
    runs = [
        list(
            val_batches(
                dataset, global_batch_size=4, micro_batch_size=micro_batch_size, dp_rank=r, dp_size=dp_size
            )
        )
        for r in range(dp_size)
    ]
    assert {len(run) for run in runs} == {3}  # every rank runs the same number of steps
    order = []
    for step in range(3):
        mbs = [run[step] for run in runs]
        assert {len(m) for m in mbs} == {4 // (dp_size * micro_batch_size)}
        ids = [i for rank_mbs in mbs for i in sample_ids(rank_mbs)]
        valid = [i for i in ids if i >= 0]
        flat = list(itertools.chain.from_iterable(mbs))
        assert all(mb["global_num_tokens"] == len(valid) * S for mb in flat)
        assert sum(mb["num_tokens"] for mb in flat) == len(valid) * S
        assert sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in flat) == len(valid) * S
        order += valid
        if step == 2:
            pad_rows = [
                row for mb in flat for row, y in zip(mb["input_ids"], mb["labels"]) if (y == -100).all()
            ]
            assert len(pad_rows) == 2 and all((row == dataset.pad_id).all() for row in pad_rows)
    assert order == list(range(10))
    limited = list(
        val_batches(dataset, global_batch_size=4, micro_batch_size=1, dp_rank=0, dp_size=1, max_steps=2)
    )
    assert len(limited) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(global_batch_size=6, micro_batch_size=4, dp_size=1),
            r"global_batch_size=6 is not divisible by "
            r"micro_batch_size=4 x dp_size=1",
        ),
        (dict(global_batch_size=8, micro_batch_size=2, dp_size=3), r"global_batch_size=8 .* dp_size=3"),
        (dict(global_batch_size=0, micro_batch_size=1, dp_size=1), r"global_batch_size=0 must be >= 1"),
        (dict(global_batch_size=4, micro_batch_size=0, dp_size=1), r"micro_batch_size=0 must be >= 1"),
        (dict(global_batch_size=4, micro_batch_size=1, dp_size=0), r"dp_size=0 must be >= 1"),
        (
            dict(global_batch_size=4, micro_batch_size=1, dp_size=2, dp_rank=2),
            r"dp_rank=2 must be in \[0, dp_size=2\)",
        ),
        (dict(global_batch_size=4, micro_batch_size=1, dp_size=2, dp_rank=-1), r"dp_rank=-1"),
        (
            dict(global_batch_size=32, micro_batch_size=1, dp_size=1),
            r"global_batch_size=32 exceeds the 20 samples",
        ),
        (dict(global_batch_size=4, micro_batch_size=1, dp_size=1, seed=-2), r"seed=-2 must be >= 0"),
    ],
)
def test_invalid_layouts(kwargs, match):
    kwargs = {"dp_rank": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        StatefulLoader(make_dataset(20), **kwargs)
    if "exceeds" not in match and "seed" not in match:  # val data may be smaller than a batch; no seed
        with pytest.raises(ValueError, match=match):
            next(val_batches(make_dataset(20), **kwargs))
    with pytest.raises(ValueError, match="max_steps=0"):
        next(val_batches(make_dataset(20), global_batch_size=4, micro_batch_size=1, max_steps=0))


def test_dataset_too_short_for_seq_len():
    with pytest.raises(
        ValueError, match=r"seq_len=4 is too long .* needs seq_len\+1=5 tokens, the data has 4"
    ):
        TokenDataset(np.arange(4), seq_len=4, vocab_size=10, eos_id=9, pad_id=9)

"""The autotuner (fastest candidate by a fake clock, cached, disk cache) and `auto` over every engine it may pick."""

import pytest
import torch

import automoe.moe.experts as experts_mod
from automoe.moe import autotune
from tests.tolerance import assert_close_rounding
from tests.unit.moe.test_experts import GRAD_DEPTH, GRAD_TERMS, Y_DEPTH, Y_TERMS, _inputs, _make, _run


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    autotune.clear()
    yield
    autotune.clear()


class FakeClock:
    """perf_counter stand-in: each `run(name)` advances it by that candidate's cost."""

    def __init__(self, cost_ms: dict[str, float]) -> None:
        self.now, self.cost, self.calls = 0.0, cost_ms, []

    def __call__(self) -> float:
        return self.now

    def run(self, name: str) -> None:
        self.calls.append(name)
        self.now += self.cost[name] / 1e3


def test_choose_times_every_candidate_then_caches():
    clock = FakeClock({"a": 3.0, "b": 1.0, "c": 2.0})
    assert autotune.choose("k", ["a", "b", "c"], clock.run, rounds=2, clock=clock) == "b"
    assert sorted(clock.calls) == sorted(["a", "b", "c"] * 4)  # two warm-up calls + 2 timed rounds each
    clock.calls.clear()
    assert autotune.choose("k", ["a", "b", "c"], clock.run, clock=clock) == "b"
    assert clock.calls == []  # cached: nothing timed again
    assert autotune.tuned_choices() == {"'k'": "b"}


def test_disk_cache_is_written_and_read_back(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    clock = FakeClock({"a": 1.0, "b": 2.0})
    assert autotune.choose(("x", 1), ["a", "b"], clock.run, clock=clock) == "a"
    autotune.clear()  # a new process: the choice comes from the file, nothing is timed
    clock = FakeClock({"a": 9.0, "b": 2.0})
    assert autotune.choose(("x", 1), ["a", "b"], clock.run, clock=clock) == "a"
    assert clock.calls == []


@pytest.mark.parametrize("engine", ["grouped_mm", "grouped_mm_t", "split", "split_t", "bmm", "bmm_t"])
@pytest.mark.parametrize("bias", [False, True])
def test_auto_matches_loop_with_every_tunable_engine(engine, bias, monkeypatch):
    monkeypatch.setattr(experts_mod, "TUNE_MIN_WORK", 0)
    monkeypatch.setattr(
        autotune, "choose", lambda key, names, run, **kw: engine if engine in names else names[0]
    )
    x, counts, dy = _inputs()
    y_ref, g_ref = _run(_make("loop", bias=bias), x, counts, dy)
    y, g = _run(_make("auto", bias=bias), x, counts, dy)
    assert_close_rounding(y, y_ref, terms=Y_TERMS, depth=Y_DEPTH)
    for name in g_ref:
        assert_close_rounding(g[name], g_ref[name], terms=GRAD_TERMS, depth=GRAD_DEPTH, msg=name)


def test_auto_tunes_once_per_shape_bucket_and_not_in_deterministic_mode(monkeypatch):
    monkeypatch.setattr(experts_mod, "TUNE_MIN_WORK", 0)
    x, counts, dy = _inputs()
    m = _make("auto")
    _run(m, x, counts, dy)
    _run(m, x, counts, dy)
    choices = autotune.tuned_choices()
    assert len(choices) == 1 and next(iter(choices.values())) in experts_mod._ENGINES
    autotune.clear()
    torch.use_deterministic_algorithms(True)
    try:
        _run(m, x, counts, dy)
    finally:
        torch.use_deterministic_algorithms(False)
    assert autotune.tuned_choices() == {}  # deterministic: the fixed rule, nothing timed


def test_candidates_far_slower_in_warm_up_are_not_timed_further():
    clock = FakeClock({"a": 10.0, "b": 1.0, "c": 2.5})
    assert autotune.choose("k", ["a", "b", "c"], clock.run, rounds=2, prune=3.0, clock=clock) == "b"
    assert clock.calls.count("a") == 2  # warm-up only: 10 ms > 3 x 1 ms
    assert clock.calls.count("b") == clock.calls.count("c") == 4


class NoisyClock(FakeClock):
    """FakeClock whose candidates cost the next value of their list each call (the last value repeats)."""

    def run(self, name: str) -> None:
        self.calls.append(name)
        costs = self.cost[name]
        self.now += costs[min(self.calls.count(name) - 1, len(costs) - 1)] / 1e3


def test_a_close_call_gets_more_rounds_for_the_close_candidates_only():
    # b is truly 4% faster than a, but its warm-up and first three timed runs were slowed down by load
    costs = {"a": [1.04], "b": [1.08, 1.08, 1.08, 1.08, 1.08, 1.00], "c": [1.3]}
    clock = NoisyClock(costs)
    assert autotune.choose("k", ["a", "b", "c"], clock.run, rounds=3, max_rounds=3, clock=clock) == "a"
    autotune.clear()
    clock = NoisyClock(costs)
    assert autotune.choose("k", ["a", "b", "c"], clock.run, rounds=3, max_rounds=8, clock=clock) == "b"
    assert clock.calls.count("c") == 5  # 2 warm-up calls + 3 rounds: 1.3 is not within 5% of the fastest
    assert clock.calls.count("a") == clock.calls.count("b") == 10  # 2 warm-up calls + 8 rounds


def test_a_clear_winner_stops_after_the_minimum_rounds():
    clock = FakeClock({"a": 1.0, "b": 1.2})
    assert autotune.choose("k", ["a", "b"], clock.run, rounds=3, max_rounds=12, clock=clock) == "a"
    assert clock.calls.count("a") == clock.calls.count("b") == 5


def test_a_slow_first_call_does_not_prune_the_fastest_candidate():
    # a's first call pays a one-time cost 10x its steady 1 ms (as CPU grouped GEMM's first bf16 call does)
    clock = NoisyClock({"a": [10.0, 1.0], "b": [1.5]})
    assert autotune.choose("k", ["a", "b"], clock.run, rounds=3, prune=3.0, clock=clock) == "a"
    assert clock.calls.count("a") == 5  # timed: its steady cost decides


def test_prefer_within_takes_the_first_listed_candidate_near_the_fastest():
    clock = FakeClock({"bmm": 1.04, "split": 1.0})
    assert autotune.choose("k", ["bmm", "split"], clock.run, prefer_within=0.05, clock=clock) == "bmm"
    autotune.clear()
    clock = FakeClock({"bmm": 1.10, "split": 1.0})
    assert autotune.choose("k", ["bmm", "split"], clock.run, prefer_within=0.05, clock=clock) == "split"
    autotune.clear()
    clock = FakeClock({"bmm": 1.04, "split": 1.0})
    assert autotune.choose("k", ["bmm", "split"], clock.run, clock=clock) == "split"  # default: the fastest


def test_auto_lists_bmm_first_and_prefers_it_only_for_equal_counts(monkeypatch):
    monkeypatch.setattr(experts_mod, "TUNE_MIN_WORK", 0)
    calls = []
    monkeypatch.setattr(
        autotune, "choose", lambda key, names, run, **kw: calls.append((names, kw)) or names[0]
    )
    for counts in ([4, 4, 4], [3, 0, 5]):
        x, cnt, dy = _inputs(counts=counts)
        _run(_make("auto", counts=counts), x, cnt, dy)
    (uniform_names, uniform_kw), (ragged_names, ragged_kw) = calls
    assert (
        uniform_names[:2] == ["bmm", "bmm_t"] and uniform_kw["prefer_within"] == experts_mod.PREFER_BMM_WITHIN
    )
    assert ragged_names[-2:] == ["bmm", "bmm_t"] and ragged_kw["prefer_within"] == 0.0

"""A small autotuner: times candidate formulations of one computation once per (device, dtype, shape bucket) and
caches the fastest for the process (optionally on disk), so a choice is made by measurement and then fixed.

`experts_backend=auto` uses it to pick the expert GEMM engine (automoe/moe/experts.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# a JSON file: choices are read from it and every new choice is written to it
CACHE_ENV = "AUTOMOE_TUNE_CACHE"
_choices: dict[str, str] = {}
_disk_loaded = False


def _key(key: Hashable) -> str:
    return repr(key)


def _load_disk() -> None:
    global _disk_loaded
    _disk_loaded = True
    path = os.environ.get(CACHE_ENV)
    if path and Path(path).exists():
        try:
            _choices.update(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            logger.warning("ignoring autotune cache %s: %s", path, e)


def _save_disk() -> None:
    path = os.environ.get(CACHE_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_choices, indent=1, sort_keys=True))


def cached(key: Hashable) -> str | None:
    """The choice made earlier for `key` (this process or the disk cache), else None."""
    if not _disk_loaded:
        _load_disk()
    return _choices.get(_key(key))


def choose(
    key: Hashable,
    candidates: Sequence[str],
    run: Callable[[str], None],
    *,
    rounds: int = 3,
    prune: float = 3.0,
    close: float = 0.05,
    max_rounds: int = 12,
    prefer_within: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> str:
    """The fastest of `candidates` for `key`: cached, else measured now. Each candidate is warmed up with two calls,
    the first untimed (a first call can pay one-time costs many times its steady cost: CPU grouped GEMM's first bf16
    call took over 3x the fastest engine's, so it was never timed), the second timed; a candidate whose timed
    warm-up took over `prune` times the fastest is not timed further (it cannot win by measurement noise alone).
    The rest are timed at least `rounds` times, interleaved so load bursts hit every candidate; the minimum over
    rounds decides (ties: the earlier candidate). A close call (candidates within `close`, as a fraction, of the
    fastest minimum) gets more rounds, for those candidates only, up to `max_rounds` in all: three rounds cannot
    separate engines 5% apart on a shared CPU. With `prefer_within` > 0 the first of `candidates` (in their order)
    within that fraction of the fastest wins: a caller that knows an effect the isolated timing cannot see lists
    the candidate it favours first. Deterministic given the cache."""
    hit = cached(key)
    if hit is not None and hit in candidates:
        return hit
    if len(candidates) == 1:
        best, done = candidates[0], 0
    else:
        warm_ms = {}
        # warm-up: one untimed call (first-call allocations, kernel selection), then one timed call to prune on
        for name in candidates:
            run(name)
            t0 = clock()
            run(name)
            warm_ms[name] = (clock() - t0) * 1e3
        fastest = min(warm_ms.values())
        timed = [n for n in candidates if warm_ms[n] <= prune * fastest]
        best_ms = {name: float("inf") for name in candidates}
        done = 0
        while done < max(rounds, 1):
            _time_round(timed, done, run, best_ms, clock)
            done += 1
        while done < max_rounds:
            fastest = min(best_ms.values())
            timed = [n for n in timed if best_ms[n] <= (1.0 + close) * fastest]
            if len(timed) < 2:
                break
            _time_round(timed, done, run, best_ms, clock)
            done += 1
        fastest = min(best_ms.values())
        best = next(n for n in candidates if best_ms[n] <= (1.0 + prefer_within) * fastest)
        logger.info(
            "autotune %s: %s (best of %d rounds, ms: %s)",
            key,
            best,
            done,
            ", ".join(f"{n} {t:.2f}" for n, t in best_ms.items()),
        )
    _choices[_key(key)] = best
    _save_disk()
    return best


def _time_round(
    names: Sequence[str],
    r: int,
    run: Callable[[str], None],
    best_ms: dict[str, float],
    clock: Callable[[], float],
) -> None:
    """One timed round: every name once, starting at a rotating position; keeps each name's minimum in `best_ms`."""
    for i in range(len(names)):
        name = names[(r + i) % len(names)]
        t0 = clock()
        run(name)
        best_ms[name] = min(best_ms[name], (clock() - t0) * 1e3)


def tuned_choices() -> dict[str, str]:
    """Every choice made or loaded in this process: repr(key) -> candidate."""
    return dict(_choices)


def clear() -> None:
    """Forget every choice (tests; a new disk cache path)."""
    global _disk_loaded
    _choices.clear()
    _disk_loaded = False

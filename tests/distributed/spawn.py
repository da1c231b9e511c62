"""The one helper that runs a test function on real gloo process groups: `automoe.parallel.spawn`, shared with the
benchmarks that measure collectives."""

from automoe.parallel.spawn import PG_TIMEOUT_S, run_distributed

__all__ = ["PG_TIMEOUT_S", "run_distributed"]

"""`train.deterministic=true`: two runs on the same machine, software and layout give bitwise equal results.

What automoe's own code does is already fixed-order: routing sorts are stable, the dispatch/combine permutations
are copies and gathers (`automoe/moe/permute.py`) and per-token sums over experts and over EP ranks are batched
GEMMs in slot order, never `index_add`/`scatter_add` atomics; the all-to-all only moves rows; gradient and
statistics all-reduces run in a fixed order for a fixed layout. The mode adds what torch needs to be
deterministic too:

- `torch.use_deterministic_algorithms(True)`: deterministic kernels where torch has them (e.g. `index_add`,
  `scatter_add` on CUDA), an error where it has none, and uninitialized memory filled before use.
- cuDNN deterministic, no autotuning; `CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS needs a fixed workspace to repeat
  its GEMMs bit for bit; set only if the user has not set it, and before the first GEMM).
- The expert GEMMs: `experts_backend=auto` runs one cuBLAS GEMM per expert on CUDA instead of torch's grouped
  GEMM, whose determinism torch does not document (see `GroupedExperts._engine`). On CPU nothing changes.

Not covered: bitwise equality across machines, torch/CUDA/NCCL versions or layouts (another layout sums in another
order; `tests/distributed/test_parallel_equivalence.py` bounds that difference instead).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)

CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def seed_all(seed: int) -> None:
    """Seed torch's, Python's and numpy's global RNGs (every rank alike: the init is layout-invariant)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Turn the deterministic mode on for this process (`enabled=False` leaves torch's settings alone)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    logger.info(
        "train.deterministic=true: deterministic algorithms (CUBLAS_WORKSPACE_CONFIG=%s)",
        os.environ["CUBLAS_WORKSPACE_CONFIG"],
    )

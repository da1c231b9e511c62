"""Suite-wide fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch_per_test():
    """Every test starts from the same torch global RNG state, whatever ran before it.

    pytest-randomly reseeds `random` and numpy per test but not torch: without this a test drawing from torch's
    global generator without seeding would see values that depend on which tests ran earlier (an order
    dependence). Tests that need particular draws still seed themselves or pass a Generator.
    """
    torch.manual_seed(0)

"""automoe.tensors: the helpers model, parallel and checkpoint code share."""

import pytest
import torch

from automoe.tensors import is_sharded, local_view, torch_dtype


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_torch_dtype_by_name(name):
    assert torch_dtype(name) is getattr(torch, name)


@pytest.mark.parametrize("name", ["float42", "nn", "Tensor"])
def test_torch_dtype_rejects_what_is_not_a_dtype(name):
    with pytest.raises(ValueError, match=f"dtype='{name}' is not a torch dtype"):
        torch_dtype(name)


class _Sharded:
    """Stands in for a DTensor: what `is_sharded` looks at (a mesh) and what `local_view` calls."""

    device_mesh = object()

    def __init__(self, local: torch.Tensor) -> None:
        self.local = local

    def to_local(self) -> torch.Tensor:
        return self.local


def test_local_view_of_a_sharded_tensor_is_its_shard():
    shard = torch.ones(2, 3)
    assert is_sharded(_Sharded(shard))
    assert local_view(_Sharded(shard)) is shard


def test_local_view_passes_plain_tensors_and_none_through():
    t = torch.nn.Parameter(torch.zeros(4))
    assert not is_sharded(t) and local_view(t) is t
    assert local_view(None) is None

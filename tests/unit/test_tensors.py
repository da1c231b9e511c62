"""automoe.tensors: the helpers model, parallel and checkpoint code share."""

import pytest
import torch

from automoe.tensors import torch_dtype


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_torch_dtype_by_name(name):
    assert torch_dtype(name) is getattr(torch, name)


@pytest.mark.parametrize("name", ["float42", "nn", "Tensor"])
def test_torch_dtype_rejects_what_is_not_a_dtype(name):
    with pytest.raises(ValueError, match=f"dtype='{name}' is not a torch dtype"):
        torch_dtype(name)

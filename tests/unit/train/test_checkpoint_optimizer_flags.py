"""Loading a checkpoint keeps this run's AdamW implementation (fused or not): it is the layout's choice, not state.

A run that fused AdamW (every parameter a DTensor, e.g. under FSDP) saves `fused=True` in its param groups; a layout
mixing DTensors and plain tensors (tensor or expert parallelism without FSDP) cannot fuse and must keep running
unfused after resuming from it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from automoe.train.checkpoint import set_model_and_optimizer_state
from tests.tolerance import assert_equal


def test_resume_keeps_the_optimizers_own_fused_flag():
    torch.manual_seed(0)
    saved = nn.Linear(4, 3)
    saved_opt = torch.optim.AdamW(saved.parameters(), lr=0.1, fused=True)
    saved(torch.randn(2, 4)).sum().backward()
    saved_opt.step()
    model_sd, optim_sd = get_state_dict(saved, saved_opt)
    assert optim_sd["param_groups"][0]["fused"] is True

    loaded = nn.Linear(4, 3)
    loaded_opt = torch.optim.AdamW(loaded.parameters(), lr=0.1, fused=False)
    set_model_and_optimizer_state(loaded, loaded_opt, model_sd, optim_sd)
    assert loaded_opt.param_groups[0]["fused"] is False  # this run's choice
    assert loaded_opt.param_groups[0]["lr"] == 0.1
    for name, value in saved_opt.state[saved.weight].items():  # the moments and the step: loaded bitwise
        assert_equal(loaded_opt.state[loaded.weight][name], value, msg=name)
    assert_equal(loaded.weight.detach(), saved.weight.detach())

"""AdamW parameter groups and the warmup + cosine/linear/constant schedule against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
from torch import nn

from automoe.config.job import OptimConfig
from automoe.config.moe import MoEConfig
from automoe.moe.experts import GroupedExperts
from automoe.train.optim import WarmupDecay, build_optimizer, build_scheduler


def reference_lr(step: int, *, peak: float, warmup: int, total: int, schedule: str, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak * (1 - (1 - floor) * p)
    return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_scheduler_follows_warmup_then_decay(schedule):
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    opt = build_optimizer(nn.Linear(3, 3), cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [
        reference_lr(s, peak=1e-2, warmup=4, total=20, schedule=schedule, floor=0.1) for s in range(20)
    ]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[3] == pytest.approx(1e-2)  # the peak is reached on the last warmup step


def test_cosine_hits_endpoints():
    fn = WarmupDecay(warmup_steps=0, total_steps=10, schedule="cosine", min_ratio=0.2)
    assert fn(0) == pytest.approx(1.0)
    assert fn(5) == pytest.approx(0.6)  # halfway: (1 + 0.2) / 2
    assert fn(10) == pytest.approx(0.2)
    assert fn(50) == pytest.approx(0.2)  # stays at the floor past the end


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.3))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.3] == {id(model[0].weight)}
    assert by_decay[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_expert_biases_get_no_decay():
    """`b_up [E, H]` and `b_down [E, D]` are 2-D but biases: no weight decay, like the router bias."""
    cfg = MoEConfig(dim=8, moe_inter_dim=4, num_experts=2, num_activated_experts=1, expert_bias=True)
    experts = GroupedExperts(cfg)
    assert experts.b_up.ndim == experts.b_down.ndim == 2
    opt = build_optimizer(experts, OptimConfig(weight_decay=0.3))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.3] == {id(experts.w_up), id(experts.w_down)}
    assert by_decay[0.0] == {id(experts.b_up), id(experts.b_down)}


def test_frozen_params_are_left_out():
    model = nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    assert [p for g in opt.param_groups for p in g["params"]] == [model.weight]


@pytest.mark.parametrize(
    "field,value",
    [("lr", 0.0), ("beta2", 1.0), ("min_lr_ratio", 1.5), ("schedule", "step"), ("warmup_steps", -1)],
)
def test_bad_optim_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimConfig(**{field: value})


def test_scheduler_state_is_plain_numbers():
    cfg = OptimConfig(warmup_steps=2)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, total_steps=5)
    opt.step()
    sched.step()
    state = json.loads(json.dumps(sched.state_dict()))  # JSON round trip: nothing pickled
    sched2 = build_scheduler(build_optimizer(nn.Linear(2, 2), cfg), cfg, total_steps=5)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 1 and sched2.get_last_lr() == sched.get_last_lr()
    assert sched2.lr_lambdas[0].total_steps == 5

"""Checkpoint round trip at world 1 (model, optimizer, scheduler, loader, RNG, gate biases) and directory rules."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from automoe.moe import moe_layers
from automoe.train import build_trainer
from automoe.train.checkpoint import (
    MARKER,
    Checkpointer,
    latest_checkpoint,
    resolve_resume,
    tensor_shape_mismatches,
)
from tests.tolerance import assert_equal
from tests.unit.train.conftest import make_job


def train_steps(trainer, n: int) -> None:
    """Run n steps through the real loop without touching the trainer's config."""
    trainer.cfg.train.stop_at_step = trainer.step + n
    trainer.fit()


def snapshot(trainer) -> dict:
    model_sd = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optim_state = {
        k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in s.items()}
        for k, s in trainer.optimizer.state_dict()["state"].items()
    }
    return {
        "model": model_sd,
        "optim": optim_state,
        "lr": [g["lr"] for g in trainer.optimizer.param_groups],
        "sched": trainer.scheduler.state_dict(),
        "loader": trainer.loader.state_dict(),
    }


def test_round_trip_restores_everything(tmp_path, env):
    cfg = make_job(tmp_path / "a", "checkpoint.interval=2")
    trainer = build_trainer(cfg, env)
    train_steps(trainer, 2)  # saves step_2 at the end of this invocation
    biases = [layer.gate.correction_bias.clone() for _, layer in moe_layers(trainer.model)]
    assert biases and all(b.abs().sum() > 0 for b in biases), "the bias update should have moved the biases"
    before = snapshot(trainer)
    ckpt = tmp_path / "a" / "checkpoints" / "step_2"
    assert (ckpt / MARKER).is_file()

    fresh = build_trainer(make_job(tmp_path / "b", f"checkpoint.resume={ckpt}"), env)
    assert fresh.step == 2
    after = snapshot(fresh)
    assert after["model"].keys() == before["model"].keys()
    for key, value in before["model"].items():  # a save/load round trip: bitwise
        assert_equal(after["model"][key], value, msg=key)
    assert any("correction_bias" in k for k in before["model"])
    assert after["optim"].keys() == before["optim"].keys()
    for pid, state in before["optim"].items():
        for name, value in state.items():
            assert_equal(
                torch.as_tensor(after["optim"][pid][name]), torch.as_tensor(value), msg=f"{pid}.{name}"
            )
    assert after["lr"] == before["lr"]
    assert after["sched"] == before["sched"]
    assert after["loader"] == before["loader"]


def test_rng_restored_on_load(tmp_path, env):
    cfg = make_job(tmp_path / "a", "checkpoint.interval=1", "train.val_interval=0")
    trainer = build_trainer(cfg, env)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    train_steps(trainer, 1)  # step_1 holds the RNG states as they were at save time
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(999)
    random.seed(0)
    np.random.seed(0)
    build_trainer(make_job(tmp_path / "b", f"checkpoint.resume={tmp_path / 'a/checkpoints/step_1'}"), env)
    got = (torch.rand(4), random.random(), np.random.rand())
    assert_equal(got[0], expected[0])  # the same generator state draws the same values
    assert got[1:] == expected[1:]


def test_latest_ignores_incomplete_and_keep_last_n(tmp_path, env):
    cfg = make_job(tmp_path, "checkpoint.interval=1", "checkpoint.keep_last_n=2", "train.val_interval=0")
    trainer = build_trainer(cfg, env)
    train_steps(trainer, 4)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]
    (root / "step_9").mkdir()  # a save that crashed before its marker
    (root / "step_9" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(root) == root / "step_4"
    assert resolve_resume("latest", root) == root / "step_4"
    with pytest.raises(ValueError, match="checkpoint.resume=.*step_9.*COMPLETE"):
        resolve_resume(str(root / "step_9"), root)
    with pytest.raises(ValueError, match="checkpoint.resume=.*is not a directory"):
        resolve_resume(str(root / "step_77"), root)
    assert resolve_resume("latest", tmp_path / "nothing_here") is None
    assert resolve_resume(None, tmp_path / "nothing_here") is None
    with pytest.raises(ValueError, match="checkpoint.resume=None .*already holds complete checkpoints"):
        resolve_resume(None, root)  # a fresh start would mix with (and prune) the checkpoints already there


def test_keep_zero_keeps_all(tmp_path, env):
    trainer = build_trainer(make_job(tmp_path, "checkpoint.interval=1", "checkpoint.keep_last_n=0"), env)
    train_steps(trainer, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]


def test_other_model_shape_is_refused_by_name(tmp_path, env):
    train_steps(
        build_trainer(make_job(tmp_path / "a", "checkpoint.interval=1", "train.val_interval=0"), env), 1
    )
    ckpt = tmp_path / "a" / "checkpoints" / "step_1"
    with pytest.raises(ValueError, match=r"model.moe.num_experts=8 \(checkpoint has 4\)"):
        build_trainer(make_job(tmp_path / "b", f"checkpoint.resume={ckpt}", "model.moe.num_experts=8"), env)


MLA = [
    "model.attention=mla",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=8",
]


@pytest.mark.parametrize(
    "override,param,fragment",
    [
        ("model.kv_lora_rank=24", "attention.kv_a_proj.weight", "model.kv_lora_rank=24 (checkpoint has 16)"),
        ("model.q_lora_rank=8", "attention.q_a_proj.weight", "model.q_lora_rank=8 (checkpoint has 16)"),
        ("model.v_head_dim=16", "attention.o_proj.weight", "model.v_head_dim=16 (checkpoint has 8)"),
        ("model.attention=gqa", "attention.q_proj.weight", "model.attention='gqa' (checkpoint has 'mla')"),
    ],
)
def test_other_mla_shape_is_refused_naming_tensor_and_field(tmp_path, env, override, param, fragment):
    """Any shape change fails before DCP reads a byte: the message names a tensor, both shapes, and the field."""
    train_steps(
        build_trainer(make_job(tmp_path / "a", *MLA, "checkpoint.interval=1", "train.val_interval=0"), env), 1
    )
    ckpt = tmp_path / "a" / "checkpoints" / "step_1"
    with pytest.raises(ValueError, match="another model shape") as info:
        build_trainer(make_job(tmp_path / "b", *MLA, override, f"checkpoint.resume={ckpt}"), env)
    text = str(info.value)
    assert fragment in text and param in text and "checkpoint has shape" in text, text


def test_tensor_shape_mismatches_names_each_kind():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    stored = {"a": (2, 5), "b": (4,), "d": (7,)}
    assert tensor_shape_mismatches(expected, stored) == [
        "a: this model has shape [2, 3], checkpoint has shape [2, 5]",
        "c: this model has shape [1], not in the checkpoint",
        "d: not in this model, checkpoint has shape [7]",
    ]
    assert tensor_shape_mismatches(expected, dict(expected)) == []


def test_corrupt_state_file_is_named(tmp_path, env):
    train_steps(
        build_trainer(make_job(tmp_path / "a", "checkpoint.interval=1", "train.val_interval=0"), env), 1
    )
    ckpt = tmp_path / "a" / "checkpoints" / "step_1"
    (ckpt / "trainer_state.json").write_text('{"format": 1, "step"')
    with pytest.raises(ValueError, match="trainer_state.json is corrupt"):
        build_trainer(make_job(tmp_path / "b", f"checkpoint.resume={ckpt}"), env)


def test_state_files_are_json(tmp_path, env):
    train_steps(build_trainer(make_job(tmp_path, "checkpoint.interval=1", "train.val_interval=0"), env), 1)
    ckpt = tmp_path / "checkpoints" / "step_1"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["loader"]["step"] == 1 and state["scheduler"]["last_epoch"] == 1
    assert json.loads((ckpt / "rng" / "rank_0.json").read_text()).keys() >= {"python", "numpy", "torch"}
    assert "num_experts: 4" in (ckpt / "config.yaml").read_text()


def test_checkpointer_rewrites_an_unfinished_step(tmp_path, env):
    trainer = build_trainer(make_job(tmp_path, "train.val_interval=0"), env)
    stale = tmp_path / "checkpoints" / "step_0"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    ckpt = Checkpointer(tmp_path / "checkpoints", config_yaml="model: {}\n")
    path = ckpt.save(
        0,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        loader=trainer.loader,
    )
    assert (path / MARKER).is_file() and not (path / "junk").exists()


def test_async_save_snapshots_the_state_then_marks_complete(tmp_path, env):
    trainer = build_trainer(make_job(tmp_path, "train.val_interval=0", "checkpoint.async_save=true"), env)
    train_steps(trainer, 1)  # no checkpoint yet: interval=0
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ckpt = trainer.checkpointer
    path = ckpt.save(
        1,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        loader=trainer.loader,
    )
    with torch.no_grad():  # training goes on while the write runs: the checkpoint must not see this
        for p in trainer.model.parameters():
            p.add_(1.0)
    ckpt.wait()
    assert (path / MARKER).is_file()
    fresh = build_trainer(make_job(tmp_path / "b", f"checkpoint.resume={path}"), env)
    for key, value in saved.items():
        assert_equal(fresh.model.state_dict()[key], value, msg=key)  # a save/load round trip: bitwise


class Hostile:
    """Unpickling this runs code: a safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, env):
    train_steps(
        build_trainer(make_job(tmp_path / "a", "checkpoint.interval=1", "train.val_interval=0"), env), 1
    )
    ckpt = tmp_path / "a" / "checkpoints" / "step_1"
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Hostile(marker)))
    with pytest.raises(ValueError, match=r"\.metadata is corrupt.*refusing to load builtins.exec"):
        build_trainer(make_job(tmp_path / "b", f"checkpoint.resume={ckpt}"), env)
    assert not marker.exists()


def test_truncated_metadata_is_named(tmp_path, env):
    train_steps(
        build_trainer(make_job(tmp_path / "a", "checkpoint.interval=1", "train.val_interval=0"), env), 1
    )
    ckpt = tmp_path / "a" / "checkpoints" / "step_1"
    data = (ckpt / ".metadata").read_bytes()
    (ckpt / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"step_1/\.metadata is corrupt"):
        build_trainer(make_job(tmp_path / "b", f"checkpoint.resume={ckpt}"), env)


def test_resume_may_turn_the_bias_update_state_on_and_off(tmp_path, env):
    """Turning on `bias_update_rule=adaptive` / `bias_update_drift` at a resume starts their state at 0 (with a
    warning), everything else restored; turning them off again does not read the saved state."""
    trainer = build_trainer(make_job(tmp_path / "a", "checkpoint.interval=2", "train.val_interval=0"), env)
    train_steps(trainer, 2)
    before = snapshot(trainer)
    ckpt = tmp_path / "a" / "checkpoints" / "step_2"
    on = ("model.moe.bias_update_rule=adaptive", "model.moe.bias_update_drift=0.02")
    with pytest.warns(UserWarning, match="holds no bias-update state"):
        fresh = build_trainer(
            make_job(tmp_path / "b", *on, "checkpoint.interval=1", f"checkpoint.resume={ckpt}"), env
        )
    assert fresh.step == 2
    sd = fresh.model.state_dict()
    added = [k for k in sd if k.endswith(("bias_step_exponent", "bias_last_sign", "bias_velocity"))]
    assert len(added) == 3 * len(list(moe_layers(fresh.model)))
    assert all(sd[k].abs().sum() == 0 for k in added)
    for k, v in before["model"].items():  # the weights and the correction biases: exactly the saved ones
        assert_equal(sd[k], v, msg=k)
    train_steps(fresh, 1)  # the new state is live: the adaptive rule and the velocity moved
    assert any(fresh.model.state_dict()[k].abs().sum() > 0 for k in added if k.endswith("bias_velocity"))
    again = build_trainer(
        make_job(tmp_path / "c", f"checkpoint.resume={tmp_path / 'b' / 'checkpoints' / 'step_3'}"), env
    )
    assert again.step == 3 and not any(k.endswith("bias_velocity") for k in again.model.state_dict())

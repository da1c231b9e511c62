"""How a run starts (issue 12 §1): on resume the command line wins for the schedule and the optimizer's settings
while the step and moments come from the checkpoint; a finished run says so; `checkpoint.init_from` starts a new
run from a checkpoint's weights (and optionally moments) on any data; wandb continues the same run."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from automoe.train import build_trainer, read_metrics
from automoe.train.build import plan_start
from automoe.train.metrics import LOSS_CURVE_FILE, WANDB_ID_FILE, save_loss_curve
from automoe.train.optim import WarmupDecay
from tests.tolerance import assert_equal
from tests.unit.train.conftest import make_job


def lrs(path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(path / "metrics.jsonl")}


def test_resume_takes_schedule_and_optimizer_settings_from_the_command_line(tmp_path, env, caplog):
    """The issue's case: a finished 6-step cosine run at lr 3e-3, resumed with steps=10 lr=1e-3 constant."""
    build_trainer(make_job(tmp_path, "checkpoint.interval=6", "train.val_interval=0"), env).fit()
    overrides = (
        "train.steps=10",
        "optim.lr=1e-3",
        "optim.schedule=constant",
        "optim.beta2=0.99",
        "optim.weight_decay=0.05",
        "checkpoint.resume=latest",
        "train.val_interval=0",
    )
    with caplog.at_level(logging.WARNING, logger="automoe"):
        trainer = build_trainer(make_job(tmp_path, *overrides), env)
    # the step counter and the AdamW moments come from the checkpoint ...
    assert trainer.step == 6 and trainer.scheduler.last_epoch == 6
    assert all(int(s["step"]) == 6 for s in trainer.optimizer.state.values())
    # ... everything the config sets comes from the command line
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == 1e-3 and group["initial_lr"] == 1e-3 and group["betas"] == (0.9, 0.99)
        assert group["weight_decay"] in (0.05, 0.0)
    assert sorted(g["weight_decay"] for g in trainer.optimizer.param_groups) == [0.0, 0.05]
    fn = trainer.scheduler.lr_lambdas[0]
    assert (fn.total_steps, fn.schedule) == (10, "constant")
    message = " ".join(r.getMessage() for r in caplog.records)
    for change in (
        "train.steps=10 (checkpoint: 6)",
        "optim.lr=0.001 (checkpoint: 0.003)",
        "optim.schedule='constant' (checkpoint: 'cosine')",
        "optim.beta2=0.99 (checkpoint: 0.95)",
    ):
        assert change in message, message
    trainer.fit()
    got = lrs(tmp_path)
    assert [got[s] for s in (7, 8, 9, 10)] == [1e-3] * 4  # warmup (2 steps) is long over: constant 1e-3


def test_resume_extends_the_schedule_to_the_new_length(tmp_path, env):
    """train.steps raised on resume: the cosine now spans the new length (the lr the uninterrupted 10-step run
    would use from step 7 on), not the checkpoint's 6."""
    build_trainer(make_job(tmp_path / "a", "checkpoint.interval=6", "train.val_interval=0"), env).fit()
    build_trainer(
        make_job(tmp_path / "a", "train.steps=10", "checkpoint.resume=latest", "train.val_interval=0"), env
    ).fit()
    fn = WarmupDecay(warmup_steps=2, total_steps=10, schedule="cosine", min_ratio=0.1)
    got = lrs(tmp_path / "a")
    for step in range(7, 11):
        assert got[step] == pytest.approx(3e-3 * fn(step - 1), rel=1e-12), step


def test_resume_of_a_finished_run_says_it_is_complete(tmp_path, env):
    build_trainer(make_job(tmp_path, "checkpoint.interval=6", "train.val_interval=0"), env).fit()
    plan = plan_start(make_job(tmp_path, "checkpoint.resume=latest"), env)
    assert plan.start_step == 6 and "the run is complete" in plan.done and "train.steps=" in plan.done
    assert plan_start(make_job(tmp_path, "checkpoint.resume=latest", "train.steps=8"), env).done is None
    early = plan_start(
        make_job(tmp_path, "checkpoint.resume=latest", "train.steps=8", "train.stop_at_step=6"), env
    )
    assert "train.stop_at_step=6 is already reached" in early.done


def test_warmup_longer_than_the_run_warns(tmp_path, env):
    plan = plan_start(make_job(tmp_path, "train.steps=4", "optim.warmup_steps=4"), env)
    assert any("optim.warmup_steps=4 >= train.steps=4" in w for w in plan.warnings)
    assert not plan_start(make_job(tmp_path, "train.steps=5", "optim.warmup_steps=4"), env).warnings


def test_init_from_takes_weights_only_on_other_data(tmp_path, env):
    """init_from: the weights (gate biases included) of the checkpoint, step/schedule/data position/moments fresh;
    another corpus (a resume would be refused: other num_samples) is fine."""
    src = build_trainer(make_job(tmp_path / "a", "checkpoint.interval=4", "train.stop_at_step=4"), env)
    src.fit()
    weights = {k: v.clone() for k, v in src.model.state_dict().items()}
    other_data = ("data.synthetic_num_tokens=6000", "data.seed=3")
    with pytest.raises(ValueError, match="checkpoint.init_from="):  # the resume refusal points at init_from
        build_trainer(
            make_job(tmp_path / "x", f"checkpoint.resume={tmp_path}/a/checkpoints/step_4", *other_data), env
        )
    # 4 steps in, the source is barely better than random: the first-loss guard would refuse the import
    new = build_trainer(
        make_job(
            tmp_path / "b",
            f"checkpoint.init_from={tmp_path}/a/checkpoints/step_4",
            *other_data,
            "train.first_loss_guard=false",
        ),
        env,
    )
    assert new.step == 0 and new.init_from_weights and new.loader.state_dict()["sample_offset"] == 0
    assert new.scheduler.last_epoch == 0 and not new.optimizer.state  # fresh moments
    for key, value in weights.items():
        assert_equal(new.model.state_dict()[key], value, msg=key)
    new.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 7))
    assert not build_trainer(make_job(tmp_path / "c", "train.steps=1"), env).init_from_weights


def test_init_from_with_optimizer_keeps_the_moments(tmp_path, env):
    src = build_trainer(make_job(tmp_path / "a", "checkpoint.interval=3", "train.stop_at_step=3"), env)
    src.fit()
    moments = {
        k: {n: t.clone() for n, t in s.items()} for k, s in src.optimizer.state_dict()["state"].items()
    }
    new = build_trainer(
        make_job(
            tmp_path / "b",
            f"checkpoint.init_from={tmp_path}/a/checkpoints/step_3",
            "checkpoint.init_optimizer=true",
            "optim.lr=5e-4",
        ),
        env,
    )
    got = new.optimizer.state_dict()["state"]
    for pid, state in moments.items():
        for name, value in state.items():
            assert_equal(torch.as_tensor(got[pid][name]), torch.as_tensor(value), msg=f"{pid}.{name}")
    assert new.step == 0 and new.scheduler.last_epoch == 0
    assert [g["lr"] for g in new.optimizer.param_groups] == [5e-4 / 2] * 2  # warmup step 1 of 2 at the new lr


def test_init_from_refuses_a_non_checkpoint_and_a_second_weight_source(tmp_path, env):
    with pytest.raises(ValueError, match="checkpoint.init_from=.*is not a directory"):
        plan_start(make_job(tmp_path / "b", f"checkpoint.init_from={tmp_path}/nope/step_3"), env)
    (tmp_path / "half" / "step_2").mkdir(parents=True)
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        plan_start(make_job(tmp_path / "b", f"checkpoint.init_from={tmp_path}/half/step_2"), env)
    with pytest.raises(ValueError, match="both give the initial weights"):
        make_job(tmp_path / "b", f"checkpoint.init_from={tmp_path}/x/step_1", f"hf.init_from={tmp_path}/hf")
    with pytest.raises(ValueError, match="needs checkpoint.init_from"):
        make_job(tmp_path / "b", "checkpoint.init_optimizer=true")


def test_resumed_run_continues_the_same_wandb_run(tmp_path, env):
    wandb = pytest.importorskip("wandb")
    del wandb
    offline = ("logging.wandb.mode=offline", "train.val_interval=0")
    build_trainer(make_job(tmp_path, "checkpoint.interval=2", "train.stop_at_step=2", *offline), env).fit()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    build_trainer(
        make_job(tmp_path, "checkpoint.interval=2", "checkpoint.resume=latest", *offline), env
    ).fit()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # wandb names a run's directory offline-run-<time>-<id>; two starts within the same second share the time, and
    # wandb then appends -1 to the second directory
    pattern = rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?"
    assert len(runs) == 2 and all(re.fullmatch(pattern, name) for name in runs), runs
    other = tmp_path / "fresh"
    build_trainer(make_job(other, "train.steps=1", *offline), env).fit()
    assert (other / WANDB_ID_FILE).read_text().strip() != run_id  # a fresh start is a new wandb run


def test_loss_curve_png_next_to_the_heatmap(tmp_path, env):
    build_trainer(make_job(tmp_path, "logging.heatmap=true", "train.val_interval=3"), env).fit()
    assert (tmp_path / "expert_load_heatmap.png").stat().st_size > 1000
    assert (tmp_path / LOSS_CURVE_FILE).stat().st_size > 1000
    assert not save_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png")
    assert math.isfinite(read_metrics(tmp_path / "metrics.jsonl")[-1]["val_loss"])

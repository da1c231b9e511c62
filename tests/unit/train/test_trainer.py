"""The training loop at world 1: loss falls, resume is bit-exact, NaN policy skip/stop, no poisoned checkpoint."""

from __future__ import annotations

import pytest
import torch

from automoe.moe import moe_layers
from automoe.train import NonFiniteError, build_trainer, read_metrics
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.train.conftest import make_job

LOOP_KEYS = ("loss", "aux_loss", "grad_norm", "lr")


def poison_step(trainer, bad_steps: set[int]) -> None:
    """Make the CE of the given steps NaN (the gradients follow)."""
    ce_sum = trainer._ce_sum

    def nan_on_bad_steps(mb):
        out = ce_sum(mb)
        return out * float("nan") if trainer.step in bad_steps else out

    trainer._ce_sum = nan_on_bad_steps


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_loss_falls_and_val_is_reported(tmp_path, env):
    cfg = make_job(tmp_path, "train.steps=30", "optim.lr=1e-2", "train.val_interval=15")
    build_trainer(cfg, env).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]


def test_resume_matches_uninterrupted_bitwise(tmp_path, env):
    build_trainer(make_job(tmp_path / "full"), env).fit()
    part = make_job(tmp_path / "part", "train.stop_at_step=3", "checkpoint.interval=3")
    build_trainer(part, env).fit()
    build_trainer(make_job(tmp_path / "part", "checkpoint.resume=latest"), env).fit()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert {k: a[k] for k in LOOP_KEYS} == {k: b[k] for k in LOOP_KEYS}, a["step"]
        assert a.get("val_loss") == b.get("val_loss")
        assert {n: m["load"] for n, m in a["moe"].items()} == {n: m["load"] for n, m in b["moe"].items()}


def test_bfloat16_autocast_trains(tmp_path, env):
    build_trainer(make_job(tmp_path, "train.dtype=bfloat16", "train.steps=3"), env).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    fp32 = make_job(tmp_path / "fp32", "train.steps=3")
    build_trainer(fp32, env).fit()
    ref = read_metrics(tmp_path / "fp32" / "metrics.jsonl")
    assert records[0]["loss"] != ref[0]["loss"]  # autocast really changed the numerics ...
    # ... but not the result. A dtype bound, not reordering: bf16 rounds each GEMM input by u = 2^-8 relative and
    # the mean loss averages those errors over the tokens; 2e-2 ~ 5 u, while a wrong path is O(1) off
    assert records[0]["loss"] == pytest.approx(ref[0]["loss"], rel=2e-2)


def test_skip_policy_drops_the_update(tmp_path, env):
    cfg = make_job(tmp_path, "train.nan_policy=skip", "train.stop_at_step=1", "train.val_interval=0")
    trainer = build_trainer(cfg, env)
    trainer.fit()
    after_step_1 = params(trainer)
    poison_step(trainer, {2})
    trainer.cfg.train.stop_at_step = 2
    trainer.fit()
    after_step_2 = params(trainer)
    for key, value in after_step_1.items():
        assert_equal(after_step_2[key], value, msg=f"{key} changed on a skipped step")  # no update: untouched
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(layer.expert_load.sum() == 0 for _, layer in moe_layers(trainer.model))
    trainer.cfg.train.stop_at_step = 3
    trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [False, True, False]
    assert records[1]["loss"] != records[1]["loss"]  # NaN is logged as it was
    assert torch.isfinite(torch.tensor(records[2]["loss"]))
    assert trainer.scheduler.last_epoch == 3  # the schedule stays aligned with the step count


def test_skip_policy_gives_up_after_max_skips(tmp_path, env):
    cfg = make_job(tmp_path, "train.nan_policy=skip", "train.nan_max_skips=2", "train.val_interval=0")
    trainer = build_trainer(cfg, env)
    poison_step(trainer, {2, 3, 4, 5})
    with pytest.raises(NonFiniteError, match="train.nan_max_skips=2"):
        trainer.fit()
    assert trainer.step == 4


def test_stop_policy_raises_and_never_checkpoints_poison(tmp_path, env):
    cfg = make_job(tmp_path, "train.nan_policy=stop", "checkpoint.interval=1", "train.val_interval=0")
    trainer = build_trainer(cfg, env)
    poison_step(trainer, {3})
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite.*train.nan_policy=stop.*step_2"):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2"]


def test_non_finite_weights_are_not_saved(tmp_path, env):
    trainer = build_trainer(make_job(tmp_path, "checkpoint.interval=1"), env)
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="parameters are not finite"):
        trainer.save_checkpoint()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_padding_rows_are_left_out_of_moe_statistics(tmp_path, env):
    """The loader's padding rows (labels all IGNORE_INDEX) route nowhere: a micro-batch with them gives the
    same expert loads, token counts, aux loss and gradients as the micro-batch without them."""
    from automoe.data import IGNORE_INDEX

    trainer = build_trainer(make_job(tmp_path, "model.moe.aux_loss_type=micro_batch"), env)
    mb = trainer.loader.next_step()[0]
    B, S = mb["input_ids"].shape
    padded = dict(mb)
    padded["input_ids"] = torch.cat([mb["input_ids"], torch.zeros(2, S, dtype=torch.long)])
    padded["labels"] = torch.cat([mb["labels"], torch.full((2, S), IGNORE_INDEX)])

    def run(batch):
        trainer.optimizer.zero_grad(set_to_none=True)
        for _, layer in moe_layers(trainer.model):
            layer.reset_statistics()
        ce, aux, _ = trainer.forward_backward([batch])
        stats = [
            (layer.expert_load.clone(), layer.step_tokens.clone()) for _, layer in moe_layers(trainer.model)
        ]
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return ce, aux, stats, grads

    ce, aux, stats, grads = run(mb)
    ce_pad, aux_pad, stats_pad, grads_pad = run(padded)
    assert stats and all(tokens == B * S for _, tokens in stats)
    for (load, tokens), (load_pad, tokens_pad) in zip(stats, stats_pad):
        assert_equal(load, load_pad)  # integer-valued counts
        assert torch.equal(tokens, tokens_pad)
    # B + 2 vs B rows per dense/attention GEMM: reordering error only. Forward: 4 reductions per block plus the
    # head and the loss's mean over the B*S tokens; gradients: that again backward, weight gradients summing B*S rows
    m = trainer.cfg.model
    terms = max(m.dim, m.ffn_inter_dim, m.moe.moe_inter_dim, m.vocab_size, B * S)
    forward_depth = 4 * m.num_layers + 2
    assert_close_rounding(ce_pad, ce, terms=terms, depth=forward_depth)
    assert_close_rounding(aux_pad, aux, terms=terms, depth=forward_depth)
    for name, g in grads.items():
        assert_close_rounding(grads_pad[name], g, terms=terms, depth=2 * forward_depth, msg=name)

"""Expert-load statistics, the metrics.jsonl schema, resume truncation, the console line and the heatmap PNG."""

from __future__ import annotations

import json
import math

import pytest
import torch

from automoe.config.job import LoggingConfig
from automoe.train import build_trainer
from automoe.train.metrics import (
    LAYER_KEYS,
    STEP_KEYS,
    MetricsLogger,
    expert_load_stats,
    flatten,
    read_metrics,
    save_expert_load_heatmap,
    truncate_metrics,
)
from tests.unit.train.conftest import make_job


def test_load_stats_against_hand_values():
    stats = expert_load_stats(torch.tensor([6.0, 2.0, 0.0, 0.0]), dropped=3)
    # mean 2, max 6 -> MaxVio 2; population std = sqrt((16 + 0 + 4 + 4) / 4) = sqrt(6)
    assert stats == {
        "load": [6, 2, 0, 0],
        "max_vio": pytest.approx(2.0),
        "cv": pytest.approx(math.sqrt(6) / 2),
        "dead_experts": 2,
        "dropped_tokens": 3,
    }
    balanced = expert_load_stats(torch.full((8,), 5.0))
    assert balanced["max_vio"] == 0 and balanced["cv"] == 0 and balanced["dead_experts"] == 0
    assert expert_load_stats(torch.zeros(4))["max_vio"] == 0  # no tokens: no division by zero


def test_step_records_follow_the_schema(tmp_path, env):
    cfg = make_job(tmp_path, "train.steps=3", "train.val_interval=3")
    build_trainer(cfg, env).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for step, line in enumerate(lines, start=1):
        record = json.loads(line)
        assert set(STEP_KEYS) <= record.keys() and record["step"] == step
        assert record["tokens"] == 8 * 16  # global batch x seq_len
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["step_time_s"])
        assert list(record["moe"]) == ["layers.1.moe"]  # num_dense_layers=1 of 2 layers
        layer = record["moe"]["layers.1.moe"]
        assert set(layer) == set(LAYER_KEYS)
        assert sum(layer["load"]) == 8 * 16 * 2  # every token routed to top-2 experts
        assert ("val_loss" in record) == (step == 3)


def test_truncate_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6)))
    truncate_metrics(path, last_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def record(step: int, loads: list[int]) -> dict:
    return {
        "step": step,
        "loss": 1.0,
        "aux_loss": 0.01,
        "grad_norm": 0.5,
        "lr": 1e-3,
        "tokens": 10,
        "tokens_per_s": 100.0,
        "step_time_s": 0.1,
        "skipped": False,
        "moe": {"layers.1.moe": expert_load_stats(torch.tensor(loads, dtype=torch.float32))},
    }


def test_logger_appends_and_summarizes(tmp_path):
    cfg = LoggingConfig(progress_bar=False, log_interval=2)
    cfg.wandb.mode = "disabled"
    log = MetricsLogger(tmp_path, cfg=cfg, is_main=True, total_steps=4)
    log.log(record(1, [4, 0]))
    line = log.summary(record(2, [3, 1]))
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    assert "step 2/4" in line and "loss 1.0000" in line and "maxvio 0.50" in line and "100 tok/s" in line
    assert flatten(record(1, [4, 0]))["moe/layers.1.moe/max_vio"] == pytest.approx(1.0)
    silent = MetricsLogger(tmp_path / "other", cfg=cfg, is_main=False, total_steps=4)
    silent.log(record(1, [1, 1]))
    silent.close()
    assert not (tmp_path / "other").exists()


def test_heatmap_png_is_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(record(s, [s, 4, 0, 2])) + "\n" for s in range(1, 6)))
    assert save_expert_load_heatmap(path, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not save_expert_load_heatmap(tmp_path / "missing.jsonl", tmp_path / "none.png")

"""Planner pipeline terms: bubble fraction, micro-batches in flight per schedule, rank 0's p2p bytes."""

import pytest

from automoe.planner import ClusterSpec, Layout, TrainingShape, activation_bytes, load_model_config
from automoe.planner.pipeline import bubble_fraction, in_flight_micro_batches, pipeline_terms


def test_bubble_fraction_per_schedule():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, virtual_stages=2) == pytest.approx(3 / 19)  # interleaving shrinks the bubble


@pytest.mark.parametrize(
    ("schedule", "v", "expected"),
    [("GPipe", 1, 8.0), ("1F1B", 1, 4.0), ("Interleaved1F1B", 2, 11 / 2), ("Interleaved1F1B", 1, 7.0)],
)
def test_in_flight_micro_batches(schedule, v, expected):
    assert in_flight_micro_batches(schedule, 4, 8, virtual_stages=v) == pytest.approx(expected)


def test_pipeline_terms_tiny_pp2_ep2():
    cfg = load_model_config("tiny")
    shape = TrainingShape(global_batch=16, micro_batch=4, seq_len=128, compute_dtype="float32", fsdp=False)
    stage = Layout(1, 2, 1, 2)  # inside a stage: 2 data ranks, ep=2 (parallel=pp2_ep2 on 4 ranks)
    terms = pipeline_terms(cfg, shape, stage, ClusterSpec(gpus_per_node=4), pp=2)
    M = 16 // (4 * 2)
    assert terms.bubble_fraction == pytest.approx(1 / (M + 1))
    assert terms.in_flight == 2
    assert terms.p2p_bytes == M * 4 * 128 * cfg.dim * 4  # gradients of stage 0's output, fp32
    assert terms.activation_bytes == pytest.approx(activation_bytes(cfg, shape, stage)["blocks"] / 2 * 2)

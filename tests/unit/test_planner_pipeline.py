"""Planner pipeline terms: bubble fraction, micro-batches in flight per schedule, rank 0's p2p bytes."""

import pytest

from automoe.config.parallel import ParallelConfig
from automoe.parallel.pipeline import stage_layer_ids
from automoe.planner import (
    GIB,
    ClusterSpec,
    Layout,
    TrainingShape,
    activation_bytes,
    load_model_config,
    plan_layout,
    state_bytes,
)
from automoe.planner.pipeline import (
    bubble_fraction,
    in_flight_micro_batches,
    p2p_messages,
    peak_activation_bytes,
    pipeline_terms,
    rank_stage,
    stage_blocks,
)


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


def test_in_flight_per_pipeline_rank():
    # 1F1B: rank r runs pp - r warm-up forwards before its first backward; GPipe: every micro-batch
    assert [in_flight_micro_batches("1F1B", 4, 8, rank=r) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight_micro_batches("GPipe", 4, 8, rank=r) for r in range(4)] == [8] * 4
    # interleaved, pp=2, v=2, M=4 (2 rounds of 2): warm-up (v-1)*2 + 2*(pp-1-r), plus one; chunks of 1/2
    assert [in_flight_micro_batches("Interleaved1F1B", 2, 4, virtual_stages=2, rank=r) for r in (0, 1)] == [
        5 / 2,
        3 / 2,
    ]


def test_interleaved_peak_follows_the_schedules_order():
    """pp=2, v=2, M=4 (2 rounds of 2), chunk bytes c0, c1. Rank 0 runs F0 F0 F1 F1 F0, then B1 F0 B1 F1 B0 ...:
    peak max(3 c0 + 2 c1, 4 c0 + c1). Rank 1 runs F0 F0 F1 B1 F1 B1 F0 B0 ...: peak max(2 c0 + c1, 3 c0)."""
    assert peak_activation_bytes("Interleaved1F1B", 2, 4, [10.0, 1.0], rank=0) == 41.0  # 4 c0 + c1
    assert peak_activation_bytes("Interleaved1F1B", 2, 4, [1.0, 10.0], rank=0) == 23.0  # 3 c0 + 2 c1
    assert peak_activation_bytes("Interleaved1F1B", 2, 4, [10.0, 1.0], rank=1) == 30.0  # 3 c0
    assert peak_activation_bytes("Interleaved1F1B", 2, 4, [1.0, 10.0], rank=1) == 12.0  # 2 c0 + c1
    assert peak_activation_bytes("1F1B", 4, 8, [5.0], rank=1) == 15.0  # 3 in flight


def test_p2p_messages_per_pipeline_rank():
    # rank 0 receives only gradients (and the inputs of its later chunks), the last rank only activations
    assert [p2p_messages(4, 8, rank=r) for r in range(4)] == [8, 16, 16, 8]
    assert [p2p_messages(2, 4, virtual_stages=2, rank=r) for r in range(2)] == [12, 12]
    assert p2p_messages(1, 8) == 0


@pytest.mark.parametrize(("pp", "v"), [(2, 1), (2, 2), (4, 1)])
def test_stage_split_is_the_trainings(pp, v):
    cfg = load_model_config("tiny")
    pcfg = ParallelConfig(pp=pp, pp_virtual_stages=v, pp_schedule="Interleaved1F1B" if v > 1 else "1F1B")
    split = stage_blocks(cfg, pp * v)
    assert split == [tuple(int(k) for k in ids) for ids in stage_layer_ids(cfg, pcfg)]
    for r in range(pp):  # loop placement: rank r holds stages r, r + pp, ...
        stage = rank_stage(split, pp, r)
        assert stage.blocks == tuple(b for s in range(r, pp * v, pp) for b in split[s])
        assert (stage.first, stage.last) == (r == 0, r == pp - 1)


def test_plan_layout_pp2_per_rank_memory_and_bubble():
    """pp=2 on 2 ranks: the two ranks' state bytes add up to the one-process model's, each rank's activations are
    its blocks' (and the head's on the last) times its micro-batches in flight; the fuller rank is reported."""
    cfg = load_model_config("tiny")
    shape = TrainingShape(global_batch=16, micro_batch=4, seq_len=128, compute_dtype="float32", fsdp=False)
    cluster = ClusterSpec(gpus_per_node=2, overhead_gib=0.0)
    p = plan_layout(cfg, shape, Layout(1, 1, 1, 1, pp=2), cluster)
    M = 4
    assert p.micro_batches == M and p.pipeline["bubble_fraction"] == pytest.approx(1 / (M + 1))
    whole = state_bytes(cfg, shape, Layout(1, 1, 1, 1))
    split = stage_blocks(cfg, 2)
    totals = []
    for r, in_flight in ((0, 2), (1, 1)):  # 1F1B: pp - r warm-up forwards
        stage = rank_stage(split, 2, r)
        act = activation_bytes(cfg, shape, Layout(1, 1, 1, 1), stage=stage)
        parts = state_bytes(cfg, shape, Layout(1, 1, 1, 1), stage=stage)
        totals.append((sum(parts.values()) + (act["blocks"] + act["head"]) * in_flight) / GIB)
        for key in whole:
            whole[key] -= parts[key]
    assert whole == {"params": 0, "grads": 0, "optimizer": 0}
    assert p.pipeline["stage_memory_gib"] == pytest.approx(totals)
    assert p.memory_total / GIB == pytest.approx(max(totals))
    assert p.pipeline["p2p_bytes"] == M * 4 * 128 * cfg.dim * 4  # one [B, S, D] fp32 tensor per micro-batch


def test_pipeline_layouts_rejected_like_training():
    cfg = load_model_config("tiny")
    cluster = ClusterSpec(gpus_per_node=8)
    few = TrainingShape(global_batch=2, micro_batch=1, seq_len=128)
    with pytest.raises(ValueError, match="fewer than parallel.pp=4 stages"):
        plan_layout(cfg, few, Layout(1, 1, 1, 1, pp=4), cluster)
    deep = TrainingShape(global_batch=16, micro_batch=1, seq_len=128)
    with pytest.raises(ValueError, match="model.num_layers=4"):
        plan_layout(cfg, deep, Layout(1, 1, 1, 1, pp=8), cluster)
    interleaved = TrainingShape(
        global_batch=16, seq_len=128, pp_schedule="Interleaved1F1B", pp_virtual_stages=2
    )
    with pytest.raises(ValueError, match="parallel.fsdp=true with parallel.pp_virtual_stages=2"):
        plan_layout(cfg, interleaved, Layout(1, 2, 1, 1, pp=2), cluster)


def test_cli_pipeline_command_composes_onto_the_job(capsys, tmp_path):
    from automoe.plan import main
    from automoe.train.build import check_layout
    from tests.doc_commands import compose_job, parse

    argv = "--model tiny --cluster cpu2 --gpus-per-node 4 --global-batch 16 --micro-batch 4 --seq-len 128"
    main([*argv.split(), "--compute-dtype", "float32", "--no-fsdp", "--pp", "2", "--pp-schedule", "GPipe"])
    out = capsys.readouterr().out
    assert (
        " pp  rep shard  cp  tp  ep" in out and "chosen: pp2-" in out and "GPipe stages [2, 2] blocks" in out
    )
    cmd = parse(next(x.strip() for x in out.splitlines() if x.strip().startswith("torchrun")), where="plan")
    job = compose_job(cmd, tmp_path)
    dims = check_layout(job, cmd.world_size)
    assert (dims.pp, job.parallel.pp_schedule, job.parallel.pp_virtual_stages) == (2, "GPipe", 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_bytes_match_the_saved_tensors_of_a_real_forward(dtype):
    """The per-component activation formulas against what autograd saves in a real forward of the tiny model
    (saved-tensor hooks, each storage once, parameters excluded), in fp32 and in bf16 (norms and router in fp32)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from automoe.models import Transformer

    cfg = dataclasses.replace(load_model_config("tiny"), dtype=dtype)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    B, S = 2, 64
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1], positions_BS=torch.arange(S).expand(B, S))
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    shape = TrainingShape(global_batch=B, micro_batch=B, seq_len=S, compute_dtype=dtype)
    predicted = sum(activation_bytes(cfg, shape, Layout(1, 1, 1, 1)).values())
    # bytes, not rounding: the formulas leave out a few router scalars per token (~32 B of ~30-50 KB per token)
    assert abs(sum(seen.values()) / predicted - 1) < 2e-3


def test_docs_worked_layout_is_the_planners(capsys):
    """The Qwen3-30B-A3B 2 x 8 layout in docs/parallelism.md is what the planner prints today."""
    import re
    import shlex
    from pathlib import Path

    from automoe.plan import main

    doc = (Path(__file__).resolve().parents[2] / "docs" / "parallelism.md").read_text()
    match = re.search(
        r"```bash\n(\.venv/bin/python -m automoe\.plan --model qwen3_30b_a3b --cluster h100x8 --nodes 2 [^`]*?)\n```"
        r"\s*```text\n(.*?)```",
        doc,
        re.S,
    )
    assert match, "the Qwen3-30B-A3B 2 x 8 planner command and its output block"
    argv = shlex.split(match.group(1).replace("\\\n", " "))[3:]
    main(argv)
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("  rejected ")]
    assert printed == match.group(2).rstrip("\n").splitlines()

"""The layout planner: routing expectation vs Monte-Carlo, memory vs hand counts, layout filtering, fit decisions."""

import math

import pytest
import torch

from automoe import planner
from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.models import Transformer

GIB = 2**30


@pytest.mark.parametrize(
    ("E", "K", "P"), [(8, 2, 2), (8, 2, 4), (64, 8, 8), (128, 8, 16), (256, 8, 8), (16, 4, 16)]
)
def test_expected_distinct_ranks_matches_monte_carlo(E, K, P):
    g = torch.Generator().manual_seed(E * 1000 + K * 10 + P)
    n = 20000
    experts_NK = torch.rand(n, E, generator=g).argsort(dim=1)[:, :K]  # K distinct experts, uniform
    hit_NP = torch.zeros(n, P, dtype=torch.bool)
    hit_NP.scatter_(1, experts_NK // (E // P), True)
    distinct_N = hit_NP.sum(1).double()
    stderr = distinct_N.std().item() / math.sqrt(n)
    assert abs(planner.expected_distinct_ranks(E, K, P) - distinct_N.mean().item()) < 4 * stderr + 1e-9


def test_expected_distinct_ranks_limits():
    assert planner.expected_distinct_ranks(8, 2, 1) == 1.0  # one rank holds everything
    assert planner.expected_distinct_ranks(8, 2, 8) == pytest.approx(2.0)  # one expert per rank: K ranks
    assert planner.expected_distinct_ranks(8, 2, 2) == pytest.approx(2 * (1 - 6 / 28))  # C(4,2)/C(8,2) = 6/28
    with pytest.raises(ValueError, match="num_experts % ep = 8 % 3"):
        planner.expected_distinct_ranks(8, 2, 3)


def test_shard_numel_follows_torch_chunk():
    for shape, n in [((3, 5), 2), ((1, 4), 4), ((10,), 4), ((7, 2, 3), 3)]:
        chunks = torch.empty(shape).chunk(n, dim=0)
        want = [c.numel() for c in chunks] + [0] * (n - len(chunks))
        assert [planner.shard_numel(shape, n, i) for i in range(n)] == want


def _small_cfg() -> ModelConfig:
    moe = MoEConfig(num_experts=4, num_activated_experts=2, moe_inter_dim=16, num_shared_experts=1)
    return ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_inter_dim=48,
        num_dense_layers=1,
        max_seq_len=64,
        moe=moe,
    )


def test_state_bytes_match_hand_count_ep2_fsdp():
    cfg = _small_cfg()
    V, D, H, G, d, Fd, E, F = 64, 32, 4, 2, 8, 48, 4, 16
    attention = D * H * d + 2 * D * G * d + H * d * D  # q, k, v, o (no biases)
    dense_block = attention + 2 * D + 3 * D * Fd  # + 2 norms + SwiGLU
    moe_block = attention + 2 * D + E * D + 3 * D * F  # + router + one shared expert of width F
    experts = E * D * 2 * F + E * F * D  # w_up [E, D, 2F], w_down [E, F, D]
    dense = V * D + dense_block + moe_block + D + V * D  # + embedding, final norm, output head
    tensors = 1 + (2 + 4 + 3) + (2 + 4 + 1 + 3 + 2) + 1 + 1
    layout = planner.Layout(dp_replicate=1, dp_shard=2, cp=1, ep=2)  # every dim 0 here is even
    shape = planner.TrainingShape(global_batch=2, micro_batch=1, seq_len=64)
    for rank in (0, 1):
        got = planner.state_bytes(cfg, shape, layout, rank=rank)
        local = dense // 2 + experts // 2  # dense over dp_shard=2; experts over ep=2 x ep_shard=1
        assert got == {"params": 4 * local, "grads": 4 * local, "optimizer": 8 * local + 4 * tensors}


def test_state_bytes_world1_equal_a_real_model():
    cfg = planner.load_model_config("tiny")
    model = Transformer(cfg)
    elems = sum(p.numel() for p in model.parameters())
    shape = planner.TrainingShape(global_batch=1, seq_len=64)
    got = planner.state_bytes(cfg, shape, planner.Layout(1, 1, 1, 1))
    assert got["params"] == 4 * elems
    assert got["optimizer"] == 8 * elems + 4 * len(list(model.parameters()))


def test_moe_activation_formula_hand_computed():
    cfg = planner.load_model_config("mixtral_8x7b")
    D, K, F, E = 4096, 2, 14336, 8
    norm = 4 * D + 4 + 2 * D  # fp32 copy of the input, 1/rms, normalized bf16 tensor
    # fp32 input, logits and scores; top-k ids and weights; fp32 top-k weights, their sum, the slots' sort order
    router = 4 * D + 4 * 2 * E + K * (8 + 2) + K * (4 + 8) + 8
    routed = K * 2 * (2 * D + 2 * F)  # per slot: input row, fused gate/up output, expert output
    want = norm + router + routed  # no shared expert: the bf16 MoE input itself is not kept
    assert planner.ffn_bytes_per_token(cfg, 0, 2) == want
    # ep=8 (one expert per rank): each token's 2 pairs keep a sent and a returned row, 2 ids and 2 weights
    assert planner.ffn_bytes_per_token(cfg, 0, 2, ep=8) == want + 2 * (2 * 2 * D + K * (2 + 8))


def test_activation_checkpointing_and_cp_shrink_activations():
    cfg = planner.load_model_config("qwen3_30b_a3b")
    shape = planner.TrainingShape(global_batch=8, seq_len=4096)
    full = planner.TrainingShape(global_batch=8, seq_len=4096, activation_checkpointing="full")
    one, two = planner.Layout(1, 8, 1, 8), planner.Layout(1, 4, 2, 8)
    act = {
        k: planner.activation_bytes(cfg, s, lay)["blocks"]
        for k, s, lay in [("none", shape, one), ("full", full, one), ("cp2", shape, two)]
    }
    assert act["full"] < act["none"] / 10
    assert act["none"] / 2 < act["cp2"] < act["none"] * 0.6  # half the tokens, plus gathered K/V and mask


def test_invalid_layouts_are_rejected_with_reason():
    cfg = ModelConfig(**{**_small_cfg().__dict__, "moe": MoEConfig(num_experts=6, num_activated_experts=2)})
    cluster = planner.ClusterSpec(gpus_per_node=4, memory_gib=10)
    shape = planner.TrainingShape(global_batch=4, seq_len=64)
    plans, rejected = planner.plan(cfg, shape, cluster)
    for p in plans:
        L = p.layout
        assert L.world_size == 4 and 6 % L.ep == 0 and (L.dp_shard * L.cp) % L.ep == 0
    reasons = {r.name(): why for r, why in rejected}
    assert "num_experts % ep = 6 % 4" in reasons["rep1-shard4-cp1-ep4"]
    assert {p.layout.name() for p in plans} >= {
        "rep1-shard4-cp1-ep2",
        "rep2-shard2-cp1-ep2",
        "rep4-shard1-cp1-ep1",
    }
    with pytest.raises(ValueError, match=r"parallel.ep=4 must divide dp_shard\*cp = 2\*1"):
        planner.plan_layout(cfg, shape, planner.Layout(2, 2, 1, 4), cluster)
    odd = planner.TrainingShape(global_batch=3, seq_len=64)
    with pytest.raises(ValueError, match="global_batch=3 is not divisible"):
        planner.plan_layout(cfg, odd, planner.Layout(1, 4, 1, 2), cluster)


def _by_name(plans):
    return {p.layout.name(): p for p in plans}


MIXTRAL_SHAPE = planner.TrainingShape(global_batch=64, seq_len=4096, activation_checkpointing="full")


def test_mixtral_fp32_adamw_needs_more_than_one_80gb_node():
    # 16 bytes per parameter (fp32 param + grad + 2 AdamW states): 46.7B x 16 B = 696 GiB > 8 x 80 GiB
    cfg = planner.load_model_config("mixtral_8x7b")
    plans, _ = planner.plan(cfg, MIXTRAL_SHAPE, planner.load_cluster("h100x8", num_nodes=1))
    assert plans and not any(p.fits for p in plans)
    assert min(sum(planner.state_bytes(cfg, MIXTRAL_SHAPE, p.layout).values()) for p in plans) > 80 * GIB


def test_mixtral_on_four_80gb_nodes_fits_with_ep8_and_dim1_expert_sharding():
    # ep=8 leaves one expert per rank and ep_shard=4: FSDP shards that expert along dim 1, so the expert state
    # per rank is 45.1B x 16 B / 32 = 21 GiB instead of the 84 GiB a whole expert would cost
    cfg = planner.load_model_config("mixtral_8x7b")
    plans = _by_name(planner.plan(cfg, MIXTRAL_SHAPE, planner.load_cluster("h100x8", num_nodes=4))[0])
    ep8 = plans["rep1-shard32-cp1-ep8"]
    assert ep8.fits
    expert_state = 16 * planner.fsdp_unit_numel(cfg)["expert_total"] / 32
    assert (
        sum(planner.state_bytes(cfg, MIXTRAL_SHAPE, ep8.layout).values()) < expert_state + 16 * 2e9 / 32 + GIB
    )


def test_mixtral_on_h200x8():
    cfg = planner.load_model_config("mixtral_8x7b")
    plans = _by_name(planner.plan(cfg, MIXTRAL_SHAPE, planner.load_cluster("h200x8"))[0])
    ep8, fsdp8, pure_dp = (
        plans["rep1-shard8-cp1-ep8"],
        plans["rep1-shard8-cp1-ep1"],
        plans["rep8-shard1-cp1-ep1"],
    )
    # 46.7B params x 16 B / 8 ranks = 87 GiB of state + a few GiB: fits 141 GiB; replicated 696 GiB does not
    assert ep8.fits and fsdp8.fits and not pure_dp.fits
    assert pure_dp.memory["params"] == 4 * 46_702_792_704
    # EP=8 replaces the expert all-gathers/reduce-scatters (every micro-batch) with a much smaller all-to-all
    assert ep8.comm_bytes < fsdp8.comm_bytes / 5
    assert "expert_a2a" in ep8.comm and "expert_a2a" not in fsdp8.comm


def test_qwen3_on_one_h100_node():
    cfg = planner.load_model_config("qwen3_30b_a3b")
    plans = _by_name(planner.plan(cfg, MIXTRAL_SHAPE, planner.load_cluster("h100x8"))[0])
    # 30.5B x 16 B / 8 = 57 GiB of state per rank; 128 experts shard evenly at ep=8
    assert plans["rep1-shard8-cp1-ep8"].fits
    assert not plans["rep8-shard1-cp1-ep1"].fits
    assert not plans["rep2-shard4-cp1-ep4"].fits  # state replicated twice: 114 GiB


def test_a2a_time_uses_intra_or_inter_node_links():
    moe = MoEConfig(num_experts=64, num_activated_experts=8, moe_inter_dim=64)
    cfg = ModelConfig(
        vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=4, num_dense_layers=0, moe=moe
    )
    cluster = planner.ClusterSpec(gpus_per_node=8, num_nodes=2, intra_node_gbps=400, inter_node_gbps=40)
    shape = planner.TrainingShape(global_batch=16, seq_len=64)
    within = planner.comm_per_step(cfg, shape, planner.Layout(1, 16, 1, 8), cluster)["expert_a2a"]
    assert within["seconds"] == pytest.approx(within["bytes"] / 400e9)
    across = planner.comm_per_step(cfg, shape, planner.Layout(1, 16, 1, 16), cluster)["expert_a2a"]
    assert across["seconds"] == pytest.approx(across["bytes"] * 8 / 15 / 40e9)  # 8 of 15 peers off-node


def test_ac_modes_are_the_trainers():
    """Every `parallel.activation_checkpointing` the trainer accepts is plannable, "moe" included."""
    from automoe.config.parallel import AC_MODES

    assert set(planner.AC_MODES) == set(AC_MODES)
    cfg = planner.load_model_config("qwen3_30b_a3b")
    one = planner.Layout(1, 8, 1, 8)
    cluster = planner.load_cluster("h100x8")
    by_mode = {
        mode: planner.TrainingShape(global_batch=8, seq_len=4096, activation_checkpointing=mode)
        for mode in ("none", "moe", "full")
    }
    act = {m: planner.activation_bytes(cfg, s, one)["blocks"] for m, s in by_mode.items()}
    assert act["full"] < act["moe"] < act["none"]  # MoE internals dominate qwen3's activations
    secs = {m: planner.compute_seconds(cfg, s, one, cluster) for m, s in by_mode.items()}
    assert secs["none"] < secs["moe"] < secs["full"]  # moe recomputes only the MoE matmuls
    a2a = {m: planner.comm_per_step(cfg, s, one, cluster)["expert_a2a"]["bytes"] for m, s in by_mode.items()}
    assert a2a["none"] < a2a["moe"] == a2a["full"]  # the MoE forward (and its all-to-all) runs again


def test_presets_are_package_data():
    """The planner reads presets from inside the `automoe` package (shipped as package data), not the repo."""
    from importlib import resources
    from pathlib import Path

    from automoe.planner import inputs

    tomllib = pytest.importorskip("tomllib")
    package = Path(str(resources.files("automoe"))).resolve()
    assert inputs.PRESETS.parent.resolve() == package
    assert (inputs.PRESETS / "model" / "mixtral_8x7b.yaml").is_file()
    assert (inputs.CLUSTERS / "h100x8.yaml").is_file() and inputs.CLUSTERS.resolve().is_relative_to(package)
    repo = Path(__file__).resolve().parents[2]
    package_data = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["automoe"]
    rel = inputs.PRESETS.relative_to(package).as_posix()
    assert any(Path(f"{rel}/model/tiny.yaml").match(p) or p == f"{rel}/**/*.yaml" for p in patterns), patterns
    clusters = inputs.CLUSTERS.resolve().relative_to(package).as_posix()
    assert any(Path(f"{clusters}/h100x8.yaml").match(p) for p in patterns), patterns


def test_table_header_names_units():
    cfg = planner.load_model_config("qwen3_30b_a3b")
    shape = planner.TrainingShape(global_batch=64, seq_len=4096, activation_checkpointing="full")
    plans, _ = planner.plan(cfg, shape, planner.load_cluster("h100x8"))
    header = planner.format_table(plans[:1]).splitlines()[0]
    assert "memory per rank, GiB" in header and "comm per step, GB" in header and "time per step, s" in header


def _plan_cli(capsys, *argv: str) -> str:
    from automoe.plan import main

    main(list(argv))
    return capsys.readouterr().out


def test_cli_prints_the_overrides_of_the_chosen_layout_and_they_launch_it(capsys, tmp_path):
    """The printed command composes onto the job schema and fits its world size (as the docs test checks the docs)."""
    from automoe.train.build import check_layout
    from tests.doc_commands import compose_job, parse

    out = _plan_cli(
        capsys,
        "--model",
        "qwen3_30b_a3b",
        "--cluster",
        "h100x8",
        "--nodes",
        "4",
        "--global-batch",
        "256",
        "--seq-len",
        "4096",
        "--ac",
        "full",
    )
    assert "chosen: rep4-shard8-cp1-ep8" in out
    line = next(x.strip() for x in out.splitlines() if x.strip().startswith("torchrun"))
    cmd = parse(line, where="plan")
    assert cmd.world_size == 32
    job = compose_job(cmd, tmp_path)
    dims = check_layout(job, cmd.world_size)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.ep) == (4, 8, 1, 8)
    assert (job.train.global_batch_size, job.data.seq_len, job.parallel.activation_checkpointing) == (
        256,
        4096,
        "full",
    )
    assert job.model.num_layers == 48 and job.train.dtype == "bfloat16"


def test_cli_says_when_no_layout_fits(capsys):
    out = _plan_cli(capsys, "--model", "deepseek_v3", "--cluster", "h100x8", "--global-batch", "8")
    assert "NO LAYOUT FITS in 80 GiB per rank" in out and "--ac full" in out and "more --nodes" in out
    assert "chosen:" not in out
    out = _plan_cli(capsys, "--model", "tiny", "--cluster", "cpu2", "--global-batch", "3", "--max-cp", "1")
    assert "NO VALID LAYOUT for 2 ranks" in out

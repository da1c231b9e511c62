"""Training steps under tensor parallelism (DTensor plans for the dense parts, sequence-parallel MoE routing),
alone and composed with EP, CP and PP, equal the single-process run: per-step loss, aux loss and grad norm, then
every parameter and gate bias after 3 AdamW steps. A DCP checkpoint saved at PP=2 x EP=2 resumes at TP=2.

One spawn per world size runs every layout of that size (each builds its own meshes); the 4-process spawn runs
first because it writes the checkpoint the 2-process spawn resumes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.config.parallel import ParallelConfig
from automoe.models.transformer import Transformer
from automoe.parallel import (
    ParallelDims,
    Pipeline,
    init_weights,
    parallelize,
)
from tests.distributed.equivalence import full, global_batch, micro_batches, rel_err, train_step
from tests.distributed.spawn import run_distributed
from tests.tolerance import assert_equal

SEQ, MICRO, STEPS, VOCAB = 8, 1, 3, 65  # an odd vocabulary: embedding and head split 33 + 32 over tp=2
TOL = 1e-5  # the bound on loss, aux loss and grad norm per step (relative); fp32 rounding is ~1e-7


def _model_cfg(aux_type: str, *, mla: bool = False) -> ModelConfig:
    moe = MoEConfig(
        num_experts=4,
        num_activated_experts=2,
        moe_inter_dim=16,
        num_shared_experts=1,
        aux_loss_coeff=0.01,
        aux_loss_type=aux_type,
        z_loss_coeff=0.001,
        gate_bias_update_factor=0.01,
        score_func="sigmoid",
        norm_topk_prob=True,
    )
    return ModelConfig(
        vocab_size=VOCAB,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_inter_dim=48,
        num_dense_layers=1,  # block 0: dense MLP (tensor-parallel), block 1: MoE (sequence-parallel routing)
        qk_norm=not mla,  # per-head q/k norms (GQA): replicated weights applied to each rank's heads
        max_seq_len=SEQ,
        moe=moe,
        # MLA (DeepSeek-V3): compressed q and kv, a RoPE key shared by every head
        **(
            dict(
                attention="mla",
                q_lora_rank=16,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=8,
            )
            if mla
            else {}
        ),
    )


def _build(cfg: ModelConfig, dims: ParallelDims, pcfg: ParallelConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, dims, pcfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    init_weights(model, dims)
    return model


def _setup(world: int, layout: dict):
    cfg = _model_cfg(layout.get("aux", "micro_batch"), mla=layout.get("mla", False))
    pcfg = ParallelConfig(
        pp=layout.get("pp", 1),
        tp=layout.get("tp", 1),
        ep=layout.get("ep", 1),
        cp=layout.get("cp", 1),
        fsdp=layout.get("fsdp", False),
        activation_checkpointing=layout.get("ac", "none"),
        pp_layers_per_stage=[1, 1] if layout.get("pp", 1) > 1 else None,
    )
    dims = ParallelDims(
        world_size=world, ep=pcfg.ep, pp=pcfg.pp, cp=pcfg.cp, tp=pcfg.tp, num_experts=cfg.moe.num_experts
    )
    dims.build_meshes()
    model = _build(cfg, dims, pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pipeline = None
    if dims.pp_enabled:
        pipeline = Pipeline(
            model,
            dims,
            pcfg,
            num_micro_batches=layout.get("micro_batches", 2),
            micro_batch_shape=(MICRO, SEQ // pcfg.cp),
            device=torch.device("cpu"),
        )
    return cfg, dims, model, opt, pipeline


def _compare(layout: dict, step: int, got: tuple, want: tuple, bound: float) -> None:
    for name, g, w in zip(("loss", "aux", "grad_norm"), got, want):
        assert abs(g - w) <= bound * abs(w), f"{layout} step {step} {name}: {g} vs {w}"


def _check_layout(world: int, layout: dict) -> None:
    """Run `layout` and the single-process reference 3 steps on the same global batches and compare; with
    `save`, write the layout's DCP checkpoint after the last step."""
    cfg, dims, model, opt, pipeline = _setup(world, layout)
    single = ParallelDims(world_size=1)
    reference = _build(cfg, single, ParallelConfig())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    dp_rank, dp_size = dims.dp_coordinate()
    per_rank = layout.get("micro_batches", 2) * MICRO
    num_seqs = dp_size * per_rank
    for step in range(STEPS):
        tokens, num_tokens = global_batch(step, num_seqs, seq=SEQ, vocab=VOCAB), num_seqs * SEQ
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        got = train_step(model, opt, dims, micro_batches(tokens, mine, num_tokens, micro=MICRO), pipeline)
        want = train_step(
            reference, ref_opt, single, micro_batches(tokens, slice(None), num_tokens, micro=MICRO)
        )
        _compare(layout, step, got, want, TOL)
    ref_params = dict(reference.named_parameters())
    tp_params = 0
    for name, p in model.named_parameters():
        tp_params += isinstance(p, DTensor) and "tp" in p.device_mesh.mesh_dim_names
        err = rel_err(full(p.detach()), ref_params[name])
        assert err <= STEPS * TOL, f"{layout} param {name} after {STEPS} steps: relative error {err}"
    assert tp_params or dims.tp == 1, "no parameter is tensor-parallel"
    ref_buffers = dict(reference.named_buffers())
    biases = {n: b for n, b in model.named_buffers() if n.endswith("correction_bias")}
    for name, b in biases.items():  # +-factor * sign of the same integer loads: bitwise
        assert_equal(b, ref_buffers[name], msg=f"{layout} {name}")
        assert b.abs().sum() > 0, "the bias update never ran"
        gathered = [torch.empty_like(b) for _ in range(dims.stage_size)]  # the ranks holding this layer
        dist.all_gather(gathered, b, group=dims.all_data_mesh.get_group())
        for x in gathered:
            assert_equal(x, b, msg="biases diverged across ranks")
    if "save" in layout:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=layout["save"])


def _check_resume(world: int, layout: dict) -> None:
    """Load the checkpoint `layout["resume"]` (written by `layout["saved_at"]` after 3 steps) into `layout`: one
    more step matches the uninterrupted single-process run's 4th step on the saved layout's global batches."""
    cfg, dims, model, opt, pipeline = _setup(world, layout)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=layout["resume"])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    single = ParallelDims(world_size=1)
    reference = _build(cfg, single, ParallelConfig())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    num_seqs = layout["saved_seqs"]  # the saved run's global batch
    for step in range(STEPS):
        mbs = micro_batches(
            global_batch(step, num_seqs, seq=SEQ, vocab=VOCAB), slice(None), num_seqs * SEQ, micro=MICRO
        )
        train_step(reference, ref_opt, single, mbs)
    # the loaded state is the uninterrupted run's, to the trajectory bound
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        err = rel_err(full(p.detach()), ref_params[name])
        assert err <= STEPS * TOL, f"resumed {layout} param {name}: relative error {err}"
    tokens = global_batch(STEPS, num_seqs, seq=SEQ, vocab=VOCAB)
    dp_rank, dp_size = dims.dp_coordinate()
    per_rank = num_seqs // dp_size
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    got = train_step(model, opt, dims, micro_batches(tokens, mine, num_seqs * SEQ, micro=MICRO), pipeline)
    want = train_step(
        reference, ref_opt, single, micro_batches(tokens, slice(None), num_seqs * SEQ, micro=MICRO)
    )
    _compare(layout, STEPS, got, want, (STEPS + 1) * TOL)


def _worker(rank: int, world: int, layouts: list[dict]) -> bool:
    for layout in layouts:
        if "resume" in layout:
            _check_resume(world, layout)
        else:
            _check_layout(world, layout)
    return True


def _world4(ckpt: str) -> list[dict]:
    return [
        # pp2 x tp2: each stage's 2 ranks shard its dense parts; stage 0 is the dense block only
        {"pp": 2, "tp": 2, "aux": "global"},
        # tp2 x cp2: a sequence split over cp x tp = 4 ranks is one sequence for the per-sequence aux loss
        {"tp": 2, "cp": 2, "aux": "sequence"},
        # the same with MLA: CP gathers the compressed latent and RoPE key, tp splits the heads
        {"tp": 2, "cp": 2, "mla": True, "aux": "sequence"},
        # tp2 x fsdp2: FSDP2 over the 2 data ranks of each tp shard (2-D DTensors), the MoE layer's grads over tp
        {"tp": 2, "fsdp": True, "aux": "sequence"},
        # tp2 x ep2 x fsdp2: experts Shard(0) over ep = the tp pair, FSDP over ep_shard
        {"tp": 2, "ep": 2, "fsdp": True},
        # pp2 x ep2 (tp=1): the checkpoint the 2-process spawn resumes at tp2
        {"pp": 2, "ep": 2, "save": ckpt},
    ]


def _world2(ckpt: str) -> list[dict]:
    return [
        # tp2: experts replicated, each tp rank routes its half of every sequence; fsdp has no data rank to
        # shard over (a warning, no effect)
        {"tp": 2, "aux": "sequence", "fsdp": True},
        # tp2 with MLA: replicated down-projections (latent, shared RoPE key), column-parallel up-projections
        {"tp": 2, "mla": True, "aux": "global"},
        # tp2 x ep2: the ep group is the tp group, the all-to-all carries each rank's own tokens; every block
        # recomputed in backward (activation checkpointing): loads counted once, the aux loss's reductions replayed
        {"tp": 2, "ep": 2, "ac": "full", "aux": "micro_batch"},
        # resume the pp2 x ep2 checkpoint (2 data ranks x 2 micro-batches per step) at tp2 (1 data rank x 4)
        {"tp": 2, "resume": ckpt, "saved_seqs": 4},
    ]


@pytest.mark.distributed
def test_tp_steps_match_single_process_and_reshard(tmp_path):
    ckpt = str(tmp_path / "pp2_ep2")
    assert all(run_distributed(_worker, 4, _world4(ckpt)))
    assert all(run_distributed(_worker, 2, _world2(ckpt)))

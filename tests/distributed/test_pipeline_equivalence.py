"""Training steps under pipeline parallelism (torch.distributed.pipelining schedules, composed with EP and DP) equal
the single-process run: per-step loss, aux loss, grad norm, then every parameter and gate bias after 3 AdamW steps.

One spawn per world size runs several layouts (each builds its own meshes), to keep the suite short. The model
has a dense first block, so with `pp_layers_per_stage=[1, ...]` stage 0 holds only the dense block (no MoE layer:
no aux loss, no bias update there).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

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
from tests.distributed.equivalence import (
    assert_step_matches,
    full,
    global_batch,
    micro_batches,
    rel_err,
    train_step,
)
from tests.distributed.spawn import run_distributed
from tests.tolerance import assert_equal

SEQ, MICRO, STEPS, VOCAB = 8, 1, 3, 64
TOL = 1e-5  # the bound on loss, aux loss and grad norm per step (relative); fp32 rounding is ~1e-7


def _model_cfg(num_layers: int) -> ModelConfig:
    moe = MoEConfig(
        num_experts=4,
        num_activated_experts=2,
        moe_inter_dim=16,
        num_shared_experts=1,
        aux_loss_coeff=0.01,
        aux_loss_type="micro_batch",
        z_loss_coeff=0.001,
        gate_bias_update_factor=0.01,
        score_func="sigmoid",
        norm_topk_prob=True,
    )
    return ModelConfig(
        vocab_size=VOCAB,
        dim=32,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        ffn_inter_dim=48,
        num_dense_layers=1,
        max_seq_len=SEQ,
        moe=moe,
    )


def _build(cfg: ModelConfig, dims: ParallelDims, pcfg: ParallelConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, dims, pcfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    init_weights(model, dims)
    return model


def _micro_batches(tokens: torch.Tensor, rows: slice, num_tokens: int) -> list[dict]:
    return micro_batches(tokens, rows, num_tokens, micro=MICRO)


def _check_layout(world: int, layout: dict) -> None:
    """Run `layout` and the single-process reference 3 steps and compare; then optionally (`reshard_to`) save a
    DCP checkpoint, load it into another layout and compare it with the reference once more."""
    cfg = _model_cfg(layout.get("layers", 2))
    pcfg = ParallelConfig(
        pp=layout["pp"],
        ep=layout.get("ep", 1),
        cp=layout.get("cp", 1),
        fsdp=layout.get("fsdp", False),
        pp_schedule=layout.get("schedule", "1F1B"),
        pp_virtual_stages=layout.get("virtual", 1),
        pp_layers_per_stage=layout.get("split"),
        activation_checkpointing=layout.get("ac", "none"),
    )
    dims = ParallelDims(world_size=world, ep=pcfg.ep, pp=pcfg.pp, cp=pcfg.cp, num_experts=cfg.moe.num_experts)
    dims.build_meshes()
    model = _build(cfg, dims, pcfg)
    single = ParallelDims(world_size=1)
    reference = _build(cfg, single, ParallelConfig())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, reference)]
    dp_rank, dp_size = dims.dp_coordinate()
    per_rank = layout.get("micro_batches", 2) * MICRO
    num_seqs = dp_size * per_rank
    pipeline = Pipeline(
        model,
        dims,
        pcfg,
        num_micro_batches=per_rank // MICRO,
        micro_batch_shape=(MICRO, SEQ // pcfg.cp),
        device=torch.device("cpu"),
    )
    for step in range(STEPS):
        tokens = global_batch(step, num_seqs, seq=SEQ, vocab=VOCAB)
        num_tokens = num_seqs * SEQ
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        got = train_step(model, opts[0], dims, _micro_batches(tokens, mine, num_tokens), pipeline)
        want = train_step(reference, opts[1], single, _micro_batches(tokens, slice(None), num_tokens))
        assert_step_matches(got, want, TOL, f"{layout} step {step}")
    ref_params = dict(reference.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names and set(names) < set(ref_params), (
        "a stage holds a part of the model, under the model's names"
    )
    for name, p in model.named_parameters():
        err = rel_err(full(p.detach()), ref_params[name])
        assert err <= STEPS * TOL, f"{layout} param {name} after {STEPS} steps: relative error {err}"
    ref_buffers = dict(reference.named_buffers())
    biases = {n: b for n, b in model.named_buffers() if n.endswith("correction_bias")}
    for name, b in biases.items():  # +-factor * sign of the same integer loads: bitwise
        assert_equal(b, ref_buffers[name], msg=f"{layout} {name}")
        assert b.abs().sum() > 0, "the bias update never ran"
    if "reshard_to" in layout:
        _reshard(world, layout, cfg, (model, opts[0]), (reference, opts[1], single), num_seqs)


def _reshard(world: int, layout: dict, cfg: ModelConfig, saved: tuple, ref: tuple, num_seqs: int) -> None:
    """Save `saved` (model, optimizer) with DCP, load it into `layout["reshard_to"]` (ParallelConfig kwargs):
    every tensor this rank saved comes back bitwise, and one more step matches the reference's."""
    model, opt = saved
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=layout["dir"])
    pcfg = ParallelConfig(fsdp=False, **layout["reshard_to"])
    dims = ParallelDims(world_size=world, ep=pcfg.ep, pp=pcfg.pp, num_experts=cfg.moe.num_experts)
    dims.build_meshes()
    loaded = _build(cfg, dims, pcfg)
    loaded_opt = torch.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.1)
    msd, osd = get_state_dict(loaded, loaded_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=layout["dir"])
    set_state_dict(loaded, loaded_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    now = dict(loaded.state_dict())
    for (
        name,
        t,
    ) in model.state_dict().items():  # collectives only within the saving stage: compare local shards
        want_full, got = full(t), now[name]
        if isinstance(got, DTensor):
            want = distribute_tensor(
                want_full, got.device_mesh, got.placements, src_data_rank=None
            ).to_local()
            got = got.to_local()
        else:
            want = want_full
        assert_equal(got, want, msg=f"{name} after resharding to {layout['reshard_to']}")
    reference, ref_opt, single = ref
    tokens = global_batch(STEPS, num_seqs, seq=SEQ, vocab=VOCAB)
    dp_rank, dp_size = dims.dp_coordinate()
    per_rank = num_seqs // dp_size
    mbs = _micro_batches(tokens, slice(dp_rank * per_rank, (dp_rank + 1) * per_rank), num_seqs * SEQ)
    got = train_step(loaded, loaded_opt, dims, mbs)
    want = train_step(reference, ref_opt, single, _micro_batches(tokens, slice(None), num_seqs * SEQ))
    assert_step_matches(got, want, (STEPS + 1) * TOL, f"resumed at {layout['reshard_to']}:")


def _worker(rank: int, world: int, layouts: list[dict]) -> bool:
    for layout in layouts:
        _check_layout(world, layout)
    return True


WORLD2 = [
    # stage 0: the dense block + embedding only; stage 1: the MoE block + head
    {"pp": 2, "split": [1, 1]},
    {"pp": 2, "split": [1, 1], "schedule": "GPipe", "ac": "full", "micro_batches": 3},
    {"pp": 2, "layers": 4, "schedule": "Interleaved1F1B", "virtual": 2, "micro_batches": 2},
]
WORLD4 = [
    # pp2 x ep2 (EP inside each stage: 2 data ranks per stage); its checkpoint resumes at pp1 x ep4
    {"pp": 2, "ep": 2, "split": [1, 1], "reshard_to": {"ep": 4}},
    {
        "pp": 2,
        "fsdp": True,
        "split": [1, 1],
    },  # pp2 x fsdp2: FSDP2 units per block / embedding / head per stage
    # pp2 x cp2, interleaved: each stage's 2 ranks split every sequence (zigzag), routing statistics over cp
    {"pp": 2, "cp": 2, "layers": 4, "schedule": "Interleaved1F1B", "virtual": 2},
]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "layouts"),
    [
        pytest.param(2, WORLD2, id="pp2-1f1b-densestage+pp2-gpipe-ac+pp2-interleaved2"),
        pytest.param(4, WORLD4, id="pp2-ep2-reshard-pp1-ep4+pp2-cp2-interleaved2"),
    ],
)
def test_pipeline_steps_match_single_process(world, layouts, tmp_path):
    layouts = [dict(layout, dir=str(tmp_path / f"ckpt{i}")) for i, layout in enumerate(layouts)]
    assert all(run_distributed(_worker, world, layouts))

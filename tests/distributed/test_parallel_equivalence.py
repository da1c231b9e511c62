"""Training steps of a small MoE transformer under EP x CP x FSDP equal the single-process run.

Both runs take their steps through the trainer's own loss assembly (`automoe.train.loss.forward_backward`). Every
rank also runs the single-process reference on the whole global batch (cut into the same micro-batches), then
asserts: per-step global loss, aux loss, every gradient after the first step, every parameter and every
gate correction bias after several AdamW steps with clipping and the DeepSeek-V3 bias update.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.config.parallel import ParallelConfig
from automoe.models.transformer import Transformer
from automoe.moe.balance import update_gate_biases
from automoe.moe.layer import BIAS_UPDATE_STATE
from automoe.parallel import ParallelDims, clip_grad_norm_, finalize_grads, parallelize, sum_over_ranks
from automoe.train.loss import forward_backward, micro_batch_ce_sum
from tests.distributed.equivalence import assert_step_matches, full, global_batch, micro_batches, rel_err
from tests.distributed.spawn import run_distributed
from tests.tolerance import assert_equal, rounding_atol

SEQ, MICRO, STEPS, VOCAB = 8, 1, 3, 64
WORLD_MAX = (
    4  # the largest world in LAYOUTS: at most 4 data-parallel ranks x 2 micro-batches of MICRO sequences
)


def _model_cfg(aux_type: str, num_experts: int = 4, rule: str = "sign", drift: float = 0.0) -> ModelConfig:
    moe = MoEConfig(
        num_experts=num_experts,
        num_activated_experts=min(2, num_experts - 1),
        moe_inter_dim=16,
        num_shared_experts=1,
        aux_loss_coeff=0.01,
        aux_loss_type=aux_type,
        z_loss_coeff=0.001,
        gate_bias_update_factor=0.01,
        bias_update_rule=rule,
        bias_update_drift=drift,
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
    model.init_weights()
    return model


def _micro_batches(tokens: torch.Tensor, rows: slice, num_tokens: int) -> list[dict]:
    return micro_batches(tokens, rows, num_tokens, micro=MICRO)


def _train_step(model, opt, dims, micro_batches, grads_out=None) -> tuple[float, float, float]:
    """One step as `Trainer.train_step` takes it (the trainer's loss assembly, gradient finalization, clipping,
    AdamW, bias update); -> (global loss, aux loss, grad norm) as the trainer logs them."""
    cpu = torch.device("cpu")
    ce_total, aux_total = forward_backward(
        model,
        micro_batches,
        dims=dims,
        device=cpu,
        ce_sum_fn=lambda mb: micro_batch_ce_sum(model, mb, dims=dims, device=cpu),
    )
    finalize_grads(model, dims)
    norm = clip_grad_norm_(model, 0.5)
    if grads_out is not None:
        grads_out.update({n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None})
    opt.step()
    update_gate_biases(model, sum_fn=lambda t: sum_over_ranks(t, dims))
    opt.zero_grad(set_to_none=True)
    # CP ranks hold disjoint pieces of the tokens
    ce = sum_over_ranks(ce_total, dims).item() / micro_batches[0]["global_num_tokens"]
    aux = sum_over_ranks(aux_total, dims).item() / (len(micro_batches) * dims.world_size)
    return ce, aux, norm.item()


def _worker(rank: int, world: int, layout: dict) -> dict:
    pcfg = ParallelConfig(
        ep=layout["ep"],
        cp=layout["cp"],
        dp_replicate=layout.get("dp_replicate", 1),
        fsdp=layout["fsdp"],
        activation_checkpointing=layout.get("ac", "none"),
        fsdp_param_dtype=layout.get("param_dtype", "float32"),
        cp_load_balance=True,
    )
    cfg = _model_cfg(
        layout.get("aux", "micro_batch"),
        layout.get("experts", 4),
        layout.get("rule", "sign"),
        layout.get("drift", 0.0),
    )
    cfg = dataclasses.replace(cfg, mtp_layers=layout.get("mtp", 0))  # DeepSeek-V3 MTP: one more MoE block
    fp32 = pcfg.fsdp_param_dtype == "float32"
    # fp32 layouts vs the single process: the same math with other GEMM row counts and other CP/EP/FSDP reduction
    # orders. Forward: 4 reductions per block, the head, the CE/aux sums (at most the widest contraction or the
    # batch's tokens); a step's gradients: that forward, the backward again, and the DP reduction + clipping.
    terms = max(cfg.dim, cfg.ffn_inter_dim, cfg.moe.moe_inter_dim, VOCAB, WORLD_MAX * 2 * MICRO * SEQ)
    step_depth = 2 * (4 * cfg.num_layers + 2) + 1
    # relative bound for one step; after AdamW steps the same bound per step is kept as a trajectory margin (AdamW
    # normalizes each element, so an element whose gradient is rounding noise moves by up to ~lr: no rounding bound)
    # bf16 mixed precision (params gathered and computed in bf16, fp32 master weights and reductions) is held to
    # bf16 accuracy instead: 2e-2 ~ 5 bf16 unit roundoffs (2^-8) on the loss-level quantities
    tol = rounding_atol(torch.float32, terms=terms, depth=step_depth, scale=1.0) if fp32 else 2e-2
    dims = ParallelDims(
        world_size=world,
        dp_replicate=pcfg.dp_replicate,
        cp=pcfg.cp,
        ep=pcfg.ep,
        num_experts=cfg.moe.num_experts,
    )
    dims.build_meshes()
    model = _build(cfg, dims, pcfg)
    if dims.ep_enabled and pcfg.fsdp and cfg.moe.num_experts // dims.ep < dims.ep_shard:
        assert any(getattr(pl, "dim", None) == 1 for pl in model.layers["1"].moe.experts.w_up.placements)
    single = ParallelDims(world_size=1)
    reference = _build(cfg, single, ParallelConfig())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, reference)]

    dp_rank, dp_size = dims.dp_coordinate()
    num_seqs = dp_size * MICRO * 2  # two micro-batches per data-parallel rank
    per_rank = num_seqs // dp_size
    grads, ref_grads = {}, {}
    for step in range(STEPS):
        tokens = global_batch(step, num_seqs, seq=SEQ, vocab=VOCAB)
        num_tokens = num_seqs * SEQ
        mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        got = _train_step(
            model, opts[0], dims, _micro_batches(tokens, mine, num_tokens), grads if step == 0 else None
        )
        want = _train_step(
            reference,
            opts[1],
            single,
            _micro_batches(tokens, slice(None), num_tokens),
            ref_grads if step == 0 else None,
        )
        step_tol = (step + 1) * tol if fp32 else tol  # one step's bound per step taken (see above)
        assert_step_matches(got, want, step_tol, f"step {step}")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():  # the first step's gradients: one step's bound
        assert rel_err(g, ref_grads[name]) <= tol, (
            f"grad {name}: relative error {rel_err(g, ref_grads[name])}"
        )
    ref_params = dict(reference.named_parameters()) if fp32 else {}  # bf16: routing flips diverge AdamW
    for name, p in model.named_parameters():
        if name not in ref_params:
            continue
        err = rel_err(full(p.detach()), ref_params[name].detach())
        assert err <= STEPS * tol, (
            f"param {name} after {STEPS} steps: relative error {err}"
        )  # a trajectory margin
    biases = {
        n: b.clone() for n, b in model.named_buffers() if n.endswith(("correction_bias", *BIAS_UPDATE_STATE))
    }
    ref_biases = dict(reference.named_buffers())
    for name, b in biases.items():
        if (
            fp32
        ):  # +-factor * sign(load deviation) of identical integer loads: bitwise (bf16 routing may flip ties)
            assert_equal(b, ref_biases[name], msg=name)
        assert b.abs().sum() > 0, "the bias update never ran"
        gathered = [torch.empty_like(b) for _ in range(world)]
        dist.all_gather(gathered, b)
        for x in gathered:
            assert_equal(
                x, b, msg="biases diverged across ranks"
            )  # every rank applies the same reduced loads
    return True


LAYOUTS = [
    pytest.param(2, {"ep": 1, "cp": 1, "fsdp": True}, id="dp2-fsdp"),
    pytest.param(2, {"ep": 1, "cp": 2, "fsdp": True, "aux": "global"}, id="cp2-fsdp-globalaux"),
    pytest.param(2, {"ep": 2, "cp": 1, "fsdp": True, "param_dtype": "bfloat16"}, id="ep2-fsdp-bf16"),
    pytest.param(4, {"ep": 4, "cp": 1, "fsdp": False}, id="ep4"),
    pytest.param(2, {"ep": 2, "cp": 1, "fsdp": True}, id="ep2-fsdp"),
    pytest.param(2, {"ep": 2, "cp": 1, "fsdp": False}, id="ep2"),
    pytest.param(
        2,
        {"ep": 2, "cp": 1, "fsdp": True, "rule": "adaptive", "drift": 0.02},
        id="ep2-fsdp-adaptive-drift-bias",
    ),
    pytest.param(2, {"ep": 2, "cp": 1, "fsdp": True, "mtp": 1}, id="ep2-fsdp-mtp"),
    pytest.param(2, {"ep": 1, "cp": 2, "fsdp": True, "aux": "sequence"}, id="cp2-fsdp-seqaux"),
    pytest.param(4, {"ep": 4, "cp": 1, "fsdp": True, "ac": "full"}, id="ep4-fsdp-ac"),
    pytest.param(4, {"ep": 2, "cp": 2, "fsdp": True}, id="ep2-cp2-fsdp"),
    pytest.param(4, {"ep": 2, "cp": 2, "fsdp": False, "aux": "sequence"}, id="ep2-cp2-seqaux"),
    pytest.param(4, {"ep": 2, "cp": 1, "fsdp": True, "dp_replicate": 2}, id="hsdp2-ep2"),
    # 2 experts over ep=2 x ep_shard=2: one expert per rank, so FSDP shards experts along dim 1
    pytest.param(4, {"ep": 2, "cp": 1, "fsdp": True, "experts": 2}, id="ep2-epshard2-dim1"),
]


@pytest.mark.distributed
@pytest.mark.parametrize(("world", "layout"), LAYOUTS)
def test_training_steps_match_single_process(world, layout):
    assert all(run_distributed(_worker, world, layout))

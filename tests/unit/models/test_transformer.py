"""The whole transformer: shapes, causality, padding, meta build + init, tying, context-parallel seam, gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.models import Transformer
from automoe.moe.layer import collect_aux_loss, moe_layers
from tests.tolerance import assert_close_rounding, assert_equal


def tiny_cfg(**overrides) -> ModelConfig:
    moe = MoEConfig(
        moe_inter_dim=32,
        num_experts=4,
        num_activated_experts=2,
        num_shared_experts=1,
        norm_topk_prob=True,
        aux_loss_coeff=0.01,
    )
    base = dict(
        vocab_size=50,
        dim=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        ffn_inter_dim=64,
        num_dense_layers=1,
        max_seq_len=64,
        moe=moe,
    )
    return ModelConfig(**{**base, **overrides})


def model_rounding(cfg: ModelConfig) -> dict:
    """Two evaluations of the model that differ only in GEMM blocking / attention kernel (other row counts,
    sequence lengths or masks): a chain of 4 reductions per block (attention scores, values, FFN in, FFN out)
    over at most the widest contraction, plus the head."""
    return dict(terms=max(cfg.dim, cfg.ffn_inter_dim, cfg.moe.moe_inter_dim), depth=4 * cfg.num_layers + 1)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def test_forward_shapes_and_finite():
    cfg = tiny_cfg()
    model = build(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (3, 11)))
    assert logits.shape == (3, 11, cfg.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
def test_changing_a_future_token_never_changes_past_logits(qk_norm):
    cfg = tiny_cfg(qk_norm=qk_norm)
    model = build(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    t = 9
    changed = tokens.clone()
    changed[:, t] = (tokens[:, t] + 1) % cfg.vocab_size
    routes = []  # each MoE gate's [B*S, K] expert choices, in call order
    hooks = [
        m.gate.register_forward_hook(lambda mod, args, out: routes.append(out.indices_TK.view(2, 16, -1)))
        for _, m in moe_layers(model)
    ]
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    for h in hooks:
        h.remove()
    # Past routing is invariant exactly. Past logits are invariant mathematically, but the changed token changes
    # every expert's row count and so the GEMM blocking of past rows: they agree up to reordering error, a chain
    # of 4 reductions per block (attention scores, values, FFN in, FFN out) over at most the FFN width, plus the head.
    num_routes = len(routes) // 2
    for layer_a, layer_b in zip(routes[:num_routes], routes[num_routes:]):
        assert_equal(layer_a[:, :t], layer_b[:, :t])
    assert_close_rounding(
        b[:, :t],
        a[:, :t],
        terms=max(cfg.dim, cfg.ffn_inter_dim, cfg.moe.moe_inter_dim),
        depth=4 * cfg.num_layers + 1,
    )
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4


def test_left_padded_sequence_matches_the_unpadded_one():
    cfg = tiny_cfg()
    model = build(cfg).eval()
    real = torch.randint(0, cfg.vocab_size, (1, 8))
    num_pad = 3
    padded = torch.cat([torch.full((1, num_pad), 7), real], dim=1)
    pad_mask = torch.zeros(1, 8 + num_pad, dtype=torch.bool)
    pad_mask[:, :num_pad] = True
    positions = torch.cat([torch.zeros(1, num_pad, dtype=torch.long), torch.arange(8)[None]], dim=1)
    with torch.no_grad():
        expected = model(real)
        got = model(padded, positions_BS=positions, padding_mask_BS=pad_mask)
        other_pad = model(padded.masked_fill(pad_mask, 3), positions_BS=positions, padding_mask_BS=pad_mask)
    assert torch.isfinite(got).all()
    # 11 vs 8 rows per GEMM and attention over 11 vs 8 keys (masked): reordering error only
    assert_close_rounding(got[:, num_pad:], expected, **model_rounding(cfg))
    assert_close_rounding(other_pad[:, num_pad:], expected, **model_rounding(cfg))


def test_meta_build_and_init_are_deterministic_and_independent_of_construction():
    cfg = tiny_cfg()
    a, b, c = build(cfg, seed=0), build(cfg, seed=0), build(cfg, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_equal(sb[k], sa[k], msg=k)  # the same seed through the same init
    assert not torch.equal(sa["tok_embeddings.weight"], sc["tok_embeddings.weight"])
    eager = Transformer(cfg)  # built on CPU: constructors consume RNG, init_weights must overwrite it all
    torch.manual_seed(0)
    eager.init_weights()
    se = eager.state_dict()
    for k in sa:
        assert_equal(se[k], sa[k], msg=k)  # init_weights overwrites everything from the same seed
    assert_equal(eager.rope.cos_PA, a.rope.cos_PA)  # the same table code
    # init statistics: residual-writing projections are depth-scaled, norms are ones. Sampling, not rounding:
    # the std of 32 x 32 = 1024 draws is off by ~1/sqrt(2 * 1024) = 2% (3-sigma truncation: -1.4%), so 15% ~ 7 sigma
    std = cfg.init_std
    assert sa["layers.0.attention.q_proj.weight"].std() == pytest.approx(std, rel=0.15)
    out_std = std / (2 * cfg.num_layers) ** 0.5
    assert sa["layers.0.attention.o_proj.weight"].std() == pytest.approx(out_std, rel=0.15)
    assert_equal(sa["layers.1.ffn_norm.weight"], torch.ones(cfg.dim))


def test_tied_embeddings_share_storage_after_meta_build():
    cfg = tiny_cfg(tie_embeddings=True)
    model = build(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert len([n for n, _ in model.named_parameters()]) == len(model.state_dict()) - 1  # one shared entry
    tokens = torch.randint(0, cfg.vocab_size, (2, 5))
    model(tokens).sum().backward()
    grad_both = model.tok_embeddings.weight.grad.clone()
    # reference: untie a copy and add the gradients of the two uses
    untied = build(dataclasses.replace(cfg, tie_embeddings=False))
    untied.load_state_dict(model.state_dict())
    untied(tokens).sum().backward()
    # bitwise: each use's gradient comes from the same kernels on the same shapes, and a sum of two is commutative
    assert_equal(grad_both, untied.tok_embeddings.weight.grad + untied.output.weight.grad)


class RecordKV:
    """kv_gather that keeps what it is handed and returns it unchanged (one process, no CP)."""

    def __call__(self, k, v, positions):
        self.k, self.v, self.positions = k, v, positions
        return k, v, positions


class ReplayKV:
    """Fake CP gather for one rank: returns the full-sequence K/V in rank order (rank 0's chunks first)."""

    def __init__(self, recorded: RecordKV, local_idx, rank_order_idx, cfg: ModelConfig):
        self.recorded, self.local_idx, self.order, self.cfg = recorded, local_idx, rank_order_idx, cfg

    def __call__(self, k, v, positions):
        rec = self.recorded
        # half the rows per GEMM through the blocks below this one: bounded by the whole model's chain
        assert_close_rounding(k, rec.k[:, :, self.local_idx], **model_rounding(self.cfg))
        assert_close_rounding(v, rec.v[:, :, self.local_idx], **model_rounding(self.cfg))
        assert torch.equal(positions, rec.positions[:, self.local_idx])
        return rec.k[:, :, self.order], rec.v[:, :, self.order], rec.positions[:, self.order]


def _cp_layout(S, layout):
    """Token indices held by each CP rank: contiguous halves, or zigzag (rank r: chunks r and 3-r of 4)."""
    if layout == "cp2-contiguous":
        return [torch.arange(S // 2), torch.arange(S // 2, S)]
    c = S // 4
    chunks = [torch.arange(i * c, (i + 1) * c) for i in range(4)]
    return [torch.cat([chunks[0], chunks[3]]), torch.cat([chunks[1], chunks[2]])]


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("layout", ["cp2-contiguous", "cp2-zigzag"])
def test_context_parallel_pieces_match_full_sequence(layout, padded):
    cfg = tiny_cfg(qk_norm=True)
    model = build(cfg).eval()
    B, S = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    pos = torch.arange(S).expand(B, S)
    pad = None
    if padded:
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[0, -5:] = True  # right padding reaching into both zigzag halves
        pad[1, :3] = True
    attns = [blk.attention for blk in model.layers.values()]
    with torch.no_grad():
        plain = model(tokens, positions_BS=pos, padding_mask_BS=pad)
        recorders = [RecordKV() for _ in attns]
        for attn, rec in zip(attns, recorders):
            attn.kv_gather = rec
        full = model(tokens, positions_BS=pos, padding_mask_BS=pad)
        assert_close_rounding(
            full, plain, **model_rounding(cfg)
        )  # masked path == is_causal path (other kernel)

        pieces = _cp_layout(S, layout)
        order = torch.cat(pieces)
        for idx in pieces:
            for attn, rec in zip(attns, recorders):
                attn.kv_gather = ReplayKV(rec, idx, order, cfg)
            local_pad = None if pad is None else pad[:, idx]
            got = model(tokens[:, idx], positions_BS=pos[:, idx], padding_mask_BS=local_pad)
            assert_close_rounding(got, full[:, idx], **model_rounding(cfg))  # half the rows per GEMM


def test_gradient_reaches_every_parameter():
    cfg = tiny_cfg(qk_norm=True, attention_bias=True)
    model = build(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (4, 32))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    aux = collect_aux_loss(model)
    assert aux is not None and aux.requires_grad
    (loss + aux).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []

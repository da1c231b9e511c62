"""The GPT-OSS SwiGLU (`swiglu_alpha`, `swiglu_up_shift` with a clamp and biases): the loop oracle against the
formula written out per row, and the fused backends' outputs and gradients against the loop."""

import pytest
import torch

import automoe.moe.experts as experts_mod
from automoe.config.moe import MoEConfig
from automoe.moe.experts import GroupedExperts
from tests.tolerance import assert_close_rounding

COUNTS = [3, 0, 7, 2]
D, FF = 16, 24
ALPHA, SHIFT, LIMIT = 1.702, 1.0, 0.4
# as tests/unit/moe/test_experts.py: up and down contractions chained; gradients one more stage
Y_TERMS, Y_DEPTH = max(D, FF) + 1, 2
GRAD_TERMS, GRAD_DEPTH = max(D, 2 * FF, max(COUNTS)) + 1, 3


def _make(backend: str) -> GroupedExperts:
    cfg = MoEConfig(
        dim=D,
        moe_inter_dim=FF,
        num_experts=len(COUNTS),
        num_activated_experts=1,
        expert_bias=True,
        swiglu_limit=LIMIT,
        swiglu_alpha=ALPHA,
        swiglu_up_shift=SHIFT,
        experts_backend=backend,
    )
    m = GroupedExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large enough that the clamp bites
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-2 if p.dim() == 3 else -1] ** 0.5)
    return m


def _inputs():
    g = torch.Generator().manual_seed(1)
    n = sum(COUNTS)
    return torch.randn(n, D, generator=g), torch.tensor(COUNTS), torch.randn(n, D, generator=g)


def _run(m, x, counts, dy):
    x = x.clone().requires_grad_()
    y = m(x, counts)
    y.backward(dy)
    return y.detach(), {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


def test_loop_is_the_gpt_oss_formula():
    """transformers' GptOssExperts: gate, up = clamp; (up + 1) * gate * sigmoid(1.702 * gate)."""
    m = _make("loop")
    x, counts, _ = _inputs()
    expert = torch.repeat_interleave(torch.arange(len(COUNTS)), counts)
    rows = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            e = int(expert[n])
            h = x[n] @ m.w_up[e] + m.b_up[e]
            gate, up = h[:FF].clamp(max=LIMIT), h[FF:].clamp(-LIMIT, LIMIT)
            rows.append(((up + 1) * gate * torch.sigmoid(gate * ALPHA)) @ m.w_down[e] + m.b_down[e])
        got = m(x, counts)
    assert (x @ m.w_up[0]).abs().max() > LIMIT  # the clamp is live
    assert_close_rounding(got, torch.stack(rows), terms=Y_TERMS, depth=Y_DEPTH)


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm", "split"])
def test_fused_backends_match_the_loop(backend, monkeypatch):
    if backend == "split":
        monkeypatch.setattr(experts_mod, "grouped_mm_supported", lambda *a, **k: False)
        backend = "auto"
    x, counts, dy = _inputs()
    y_ref, g_ref = _run(_make("loop"), x, counts, dy)
    y, g = _run(_make(backend), x, counts, dy)
    assert_close_rounding(y, y_ref, terms=Y_TERMS, depth=Y_DEPTH)
    for name in g_ref:
        assert_close_rounding(g[name], g_ref[name], terms=GRAD_TERMS, depth=GRAD_DEPTH, msg=name)


def test_alpha_and_shift_need_swiglu():
    with pytest.raises(ValueError, match=r"MoEConfig\.swiglu_alpha=1\.702.*expert_activation='swiglu'"):
        MoEConfig(expert_activation="geglu", swiglu_alpha=1.702)
    with pytest.raises(ValueError, match=r"MoEConfig\.swiglu_alpha=0\.0 must be > 0"):
        MoEConfig(swiglu_alpha=0.0)

"""RMSNorm, RoPE and attention against naive references written here (complex rotation, explicit softmax)."""

import math

import pytest
import torch

from automoe.config.model import ModelConfig
from automoe.models.attention import Attention
from automoe.models.norms import RMSNorm
from automoe.models.rope import RotaryEmbedding, apply_rotary
from tests.tolerance import assert_close_rounding, assert_equal

# fp32 attention vs the fp64-core reference (same projections): scores over head_dim, softmax and values over S,
# then o_proj over dim on inputs differing by that rounding: 3 chained reductions of at most dim = 32 terms
ATTN_TERMS, ATTN_DEPTH = 32, 3


def test_rmsnorm_matches_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 4
    x64 = x.double()
    expected = norm.weight.double() * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5)
    # fp32 vs an fp64 reference: the 16-feature mean of squares, then rsqrt and the two products: 2 stages
    assert_close_rounding(norm(x), expected.float(), terms=16, depth=2)
    assert norm(x.bfloat16()).dtype == torch.float32  # fp32 weight * bf16 normalized input, as HF
    assert RMSNorm(16, dtype=torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_rope_matches_complex_rotation_of_half_pairs():
    A, theta, P = 16, 500.0, 64
    rope = RotaryEmbedding(A, max_seq_len=P, theta=theta)
    torch.manual_seed(0)
    x_BHSA = torch.randn(2, 3, 5, A)
    positions_BS = torch.tensor([[0, 1, 2, 3, 4], [63, 7, 40, 0, 9]])
    cos, sin = rope(positions_BS)
    got = apply_rotary(x_BHSA, cos, sin)

    # reference: complex z_i = x_i + j x_{i+A/2}, multiplied by exp(j * pos * theta^(-2i/A))
    x64 = x_BHSA.double()
    z = torch.complex(x64[..., : A // 2], x64[..., A // 2 :])
    freqs = theta ** (-torch.arange(0, A, 2, dtype=torch.float64) / A)
    angle = positions_BS.double()[:, None, :, None] * freqs
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    # fp32 vs fp64: the angle pos * freq rounds to an absolute error up to P * u (counted as P terms), then the
    # 2-term rotation; both scale with |x|
    assert_close_rounding(got, expected.float(), terms=P, depth=2, scale=x_BHSA)


def test_rope_tables_are_non_persistent_and_rebuilt_after_meta():
    eager = RotaryEmbedding(8, max_seq_len=32, theta=1e4)
    assert "cos_PA" not in eager.state_dict()
    with torch.device("meta"):
        lazy = RotaryEmbedding(8, max_seq_len=32, theta=1e4)
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert_equal(lazy.cos_PA, eager.cos_PA)  # the same table code on the same shapes
    assert_equal(lazy.sin_PA, eager.sin_PA)


def _attn(qk_norm=False, bias=False, heads=4, kv_heads=2):
    cfg = ModelConfig(
        dim=32, num_heads=heads, num_kv_heads=kv_heads, qk_norm=qk_norm, attention_bias=bias, max_seq_len=16
    )
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.uniform_(-0.3, 0.3)
    return cfg, attn


def _reference_attention(attn, x, cos, sin, visible_SS):
    """Plain multi-head attention: K/V heads repeated for their query group, explicit masked softmax."""
    B, S, _ = x.shape
    H, G, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, S, H, Dh)
    k = attn.k_proj(x).view(B, S, G, Dh)
    v = attn.v_proj(x).view(B, S, G, Dh)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))
    q, k = apply_rotary(q, cos.double(), sin.double()), apply_rotary(k, cos.double(), sin.double())
    group = torch.arange(H) // (H // G)  # query head h reads kv head h // (H/G)
    k, v = k[:, group], v[:, group]
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    scores = scores.masked_fill(~visible_SS, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H * Dh)
    return attn.o_proj(y.float())


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 1), (4, 4)], ids=["gqa2", "mqa", "mha"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
def test_gqa_matches_repeated_kv_reference(heads, kv_heads, qk_norm):
    cfg, attn = _attn(qk_norm=qk_norm, bias=True, heads=heads, kv_heads=kv_heads)
    B, S = 2, 7
    x = torch.randn(B, S, cfg.dim)
    pos = torch.arange(S).expand(B, S)
    cos, sin = RotaryEmbedding(cfg.head_dim, max_seq_len=16, theta=cfg.rope_theta)(pos)
    with torch.no_grad():
        expected = _reference_attention(attn, x, cos, sin, torch.ones(S, S, dtype=torch.bool).tril())
        fast = attn(x, cos, sin, positions_BS=pos)
        masked = attn(x, cos, sin, positions_BS=pos, padding_mask_BS=torch.zeros(B, S, dtype=torch.bool))
    assert_close_rounding(fast, expected, terms=ATTN_TERMS, depth=ATTN_DEPTH)
    assert_close_rounding(masked, expected, terms=ATTN_TERMS, depth=ATTN_DEPTH)


def test_padding_keys_are_never_attended_and_padded_rows_stay_finite():
    cfg, attn = _attn()
    B, S = 2, 6
    x = torch.randn(B, S, cfg.dim)
    pos = torch.arange(S).expand(B, S)
    cos, sin = RotaryEmbedding(cfg.head_dim, max_seq_len=16, theta=cfg.rope_theta)(pos)
    left_padded = [True, True, False, False, False, False]
    right_padded = [False, False, False, True, True, True]
    pad = torch.tensor([left_padded, right_padded])
    with torch.no_grad():
        y = attn(x, cos, sin, positions_BS=pos, padding_mask_BS=pad)
        assert torch.isfinite(y).all()
        for b in range(B):
            causal = torch.ones(S, S, dtype=torch.bool).tril()
            expected = _reference_attention(
                attn, x[b : b + 1], cos[b : b + 1], sin[b : b + 1], causal & ~pad[b][None, :]
            )
            real = ~pad[b]
            assert_close_rounding(y[b, real], expected[0, real], terms=ATTN_TERMS, depth=ATTN_DEPTH)
        # garbage in the padded rows' inputs never reaches the real rows
        x_noisy = torch.where(pad[..., None], torch.randn_like(x) * 100, x)
        y_noisy = attn(x_noisy, cos, sin, positions_BS=pos, padding_mask_BS=pad)
    # bitwise: same shapes and kernels; projections are per row and masked keys enter as exact zero weights
    assert_equal(y_noisy[~pad], y[~pad])

"""Multi-head Latent Attention beyond HF parity: the context-parallel seam, padding, and the DeepSeek-V3 preset's
parameter count (meta device)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from automoe.config.model import ModelConfig
from automoe.models import Transformer, num_params
from automoe.models.mla import MultiHeadLatentAttention
from tests.tolerance import assert_close_rounding

PRESETS = Path(__file__).resolve().parents[3] / "configs" / "model"


def _assert_mla_close(got: torch.Tensor, ref: torch.Tensor, cfg: ModelConfig) -> None:
    """Same MLA math on other row counts / sequence lengths: reordering error along the longest chain, q_a (dim),
    q_b (q_lora_rank), scores (head dim), values (S), o_proj (heads * v_head_dim): 5 reductions of <= dim terms."""
    assert_close_rounding(
        got, ref, terms=max(cfg.dim, cfg.num_heads * cfg.v_head_dim, cfg.q_lora_rank), depth=5
    )


def load_preset(name: str) -> ModelConfig:
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))
    )


def _mla(seed=0) -> tuple[MultiHeadLatentAttention, ModelConfig]:
    cfg = load_preset("tiny_dsv3")
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    return model.layers["0"].attention, model


class TwoRankGather:
    """Simulates CP=2 in one process: returns the latents of both sequence chunks, chunk 0 first."""

    def __init__(self):
        self.chunks = {}

    def __call__(self, k_B1SC, v_B1SR, positions_BS):
        self.chunks[int(positions_BS[0, 0])] = (k_B1SC, v_B1SR, positions_BS)
        parts = [self.chunks[key] for key in sorted(self.chunks)]
        return tuple(torch.cat([p[i] for p in parts], dim=2 if i < 2 else 1) for i in range(3))


def test_cp_seam_gathers_compressed_latents_and_matches_full_sequence():
    attn, model = _mla()
    B, S = 2, 16
    x_BSD = torch.randn(B, S, model.cfg.dim)
    positions_BS = torch.arange(S).expand(B, S)
    cos, sin = model.rope(positions_BS)
    full = attn(x_BSD, cos, sin, positions_BS=positions_BS)

    gather = TwoRankGather()
    attn.kv_gather = gather
    halves = [slice(0, S // 2), slice(S // 2, S)]
    with torch.no_grad():  # rank 0 runs first (its gather sees only its own chunk: causal, so that suffices)
        for h in halves:
            attn(x_BSD[:, h], cos[:, h], sin[:, h], positions_BS=positions_BS[:, h])
    k, v, _ = gather.chunks[0]
    assert k.shape == (B, 1, S // 2, model.cfg.kv_lora_rank) and v.shape == (
        B,
        1,
        S // 2,
        model.cfg.qk_rope_head_dim,
    )
    # now every rank sees both chunks, as an all-gather provides
    outs = [attn(x_BSD[:, h], cos[:, h], sin[:, h], positions_BS=positions_BS[:, h]) for h in halves]
    _assert_mla_close(torch.cat(outs, dim=1), full, model.cfg)  # half the rows per GEMM


def test_padding_is_never_attended_to():
    attn, model = _mla(seed=1)
    x_BSD = torch.randn(2, 12, model.cfg.dim)
    positions_BS = torch.arange(12).expand(2, 12)
    cos, sin = model.rope(positions_BS)
    pad_BS = torch.zeros(2, 12, dtype=torch.bool)
    pad_BS[0, 3:5] = True  # two padding tokens in the middle of row 0
    masked = attn(x_BSD, cos, sin, positions_BS=positions_BS, padding_mask_BS=pad_BS)
    keep = ~pad_BS[0]
    alone = attn(
        x_BSD[:1, keep],
        cos[:1, : int(keep.sum())],
        sin[:1, : int(keep.sum())],
        positions_BS=positions_BS[:1, : int(keep.sum())],
    )
    # without the padding rows, row 0 is a shorter sequence; its RoPE positions shift, so compare the prefix
    _assert_mla_close(masked[0, :3], alone[0, :3], model.cfg)  # 10 vs 12 keys and rows
    _assert_mla_close(
        masked[1], attn(x_BSD[1:], cos[1:], sin[1:], positions_BS=positions_BS[1:])[0], model.cfg
    )
    assert torch.isfinite(masked).all()


def test_deepseek_v3_preset_has_the_published_671b_main_model_parameters():
    cfg = load_preset("deepseek_v3")
    counts = num_params(cfg)  # meta device: nothing is allocated
    assert abs(counts.total - 671e9) / 671e9 < 0.005, counts.total
    assert abs(counts.active - 37e9) / 37e9 < 0.02, counts.active  # published: 37B activated per token
    assert (cfg.num_layers, cfg.num_moe_layers, cfg.moe.num_experts, cfg.vocab_size) == (61, 58, 256, 129280)


def test_tiny_dsv3_preset_trains_one_step():
    _, model = _mla()
    tokens = torch.randint(0, 259, (2, 32))
    loss = torch.nn.functional.cross_entropy(
        model(tokens)[:, :-1].reshape(-1, 259), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers["1"].attention.kv_b_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention": "mla", "attention_sinks": True}, "attention_sinks=True needs attention='gqa'"),
        ({"rope_dim": 6, "dim": 16, "num_heads": 4}, "rope_dim=6 must be even and in"),
        ({"sliding_window": 8}, r"sliding_window=8 and sliding_window_layers=\[\] must be set together"),
        ({"sliding_window": 8, "sliding_window_layers": [9]}, r"sliding_window_layers=\[9\] must index"),
        ({"attention": "mla", "qk_rope_head_dim": 7}, "qk_rope_head_dim=7"),
        ({"attention": "mla", "q_lora_rank": 0}, "q_lora_rank=0"),
        ({"attention": "mla", "qk_norm": True}, "qk_norm=True"),
        ({"attention": "flash"}, "attention='flash'"),
    ],
)
def test_invalid_attention_settings(overrides, message):
    with pytest.raises(ValueError, match=f"ModelConfig.{message}"):
        ModelConfig(**overrides)

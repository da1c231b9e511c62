"""Sparse upcycling: at initialization the upcycled model computes the dense model's logits (experts equal, top-k
weights renormalized; also with the dense MLP kept as a shared expert), for an automoe dense model and for dense
transformers Llama / Qwen2 / Qwen3 models; training then moves it away and the experts drift apart; the result
exports as an HF MoE family that transformers loads with the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automoe.config.model import ModelConfig
from automoe.hf.upcycle import load_dense_hf, upcycle
from automoe.models import Transformer
from tests.tolerance import assert_close_rounding

V, S = 97, 16
DENSE = ModelConfig(
    vocab_size=V,
    dim=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_inter_dim=48,
    num_dense_layers=2,
    max_seq_len=64,
)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(seed))


def _dense_model(cfg: ModelConfig = DENSE) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    with torch.no_grad():  # non-trivial MLPs, so that a wrong expert combination shows
        for name, p in model.named_parameters():
            if ".feed_forward." in name:
                p.normal_(0, 0.2)
    return model.eval()


def _assert_same_logits(got, ref, cfg):
    # the same math up to reordering: 4 reductions per layer + head, each at most the widest contraction; the MoE
    # adds the K-term weighted sum of equal outputs
    assert_close_rounding(got, ref, terms=max(cfg.dim, cfg.ffn_inter_dim, S), depth=5 * cfg.num_layers + 1)


@pytest.mark.parametrize("shared_expert", [False, True], ids=["routed", "shared"])
def test_upcycled_model_starts_as_the_dense_model(shared_expert):
    dense = _dense_model()
    moe = upcycle(DENSE, dense.state_dict(), num_experts=4, top_k=2, shared_expert=shared_expert).eval()
    assert moe.cfg.num_moe_layers == 2 and moe.cfg.moe.norm_topk_prob
    experts = moe.layers["0"].moe.experts.w_up
    assert all(torch.equal(experts[e], experts[0]) for e in range(4))
    tokens = _tokens()
    with torch.no_grad():
        _assert_same_logits(moe(tokens), dense(tokens), DENSE)


def test_training_moves_away_from_the_dense_model_and_experts_specialise():
    dense = _dense_model()
    moe = upcycle(DENSE, dense.state_dict(), num_experts=4, top_k=2, router_std=0.5).train()
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)

    def spread() -> float:
        """Mean distance of each expert's up weights from the experts' mean, relative to its norm."""
        w = moe.layers["1"].moe.experts.w_up.detach()
        return float((w - w.mean(0)).norm() / w.norm())

    spreads = [spread()]
    for step in range(12):
        tokens = _tokens(step)
        logits = moe(tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        spreads.append(spread())
    assert spreads[0] == 0.0 and spreads[6] > 1e-2 and spreads[-1] > spreads[6]  # measured: 0, 0.035, 0.050
    with torch.no_grad():
        assert (moe.eval()(_tokens()) - dense(_tokens())).abs().max() > 1e-2


def _hf_dense(case: str):
    tf = pytest.importorskip("transformers")
    common = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config = {
        "llama": lambda: tf.LlamaConfig(**common, attention_bias=True),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
    }[case]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_dense_hf_models_upcycle_to_their_own_logits(case, tmp_path):
    hf = _hf_dense(case)
    hf.save_pretrained(tmp_path)
    cfg, state = load_dense_hf(tmp_path)
    assert (cfg.qkv_bias, cfg.attention_bias, cfg.qk_norm) == {
        "llama": (False, True, False),
        "qwen2": (True, False, False),
        "qwen3": (False, False, True),
    }[case]
    moe = upcycle(cfg, state, num_experts=4, top_k=2, noise=0.0).eval()
    tokens = _tokens()
    with torch.no_grad():
        _assert_same_logits(moe(tokens), hf(tokens).logits, cfg)


def test_upcycled_llama_exports_as_mixtral_with_the_same_logits(tmp_path):
    """The classic path (Mixtral from Mistral): the export reloads in transformers as a Mixtral."""
    tf = pytest.importorskip("transformers")
    from automoe.hf import save_hf_checkpoint

    hf = _hf_dense("llama")
    hf.config.attention_bias = False
    for layer in hf.model.layers:  # Mixtral attention has no biases
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, proj).bias = None
    hf.save_pretrained(tmp_path / "dense")
    cfg, state = load_dense_hf(tmp_path / "dense")
    moe = upcycle(cfg, state, num_experts=4, top_k=2, noise=0.05).eval()
    save_hf_checkpoint(moe, moe.cfg, tmp_path / "moe", family="mixtral")
    mixtral = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        _assert_same_logits(mixtral(tokens).logits, moe(tokens), cfg)


def test_script_upcycles_an_automoe_dense_checkpoint(tmp_path):
    """scripts/upcycle.py from an automoe checkpoint directory to an automoe one (no --family)."""
    import importlib.util

    from omegaconf import OmegaConf

    from automoe.convert import CONFIG_NAME, read_automoe
    from tests.unit.test_script_defaults import REPO

    dense = _dense_model()
    (tmp_path / "dense").mkdir()
    OmegaConf.save(OmegaConf.structured(DENSE), tmp_path / "dense" / CONFIG_NAME)
    torch.save(dense.state_dict(), tmp_path / "dense" / "model.pt")
    spec = importlib.util.spec_from_file_location("upcycle_script", REPO / "scripts" / "upcycle.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "4", "--top-k", "2"])
    cfg, state = read_automoe(tmp_path / "moe")
    assert (cfg.moe.num_experts, cfg.num_moe_layers) == (4, 2)
    moe = Transformer(cfg).eval()
    moe.load_state_dict(state)
    with torch.no_grad():
        _assert_same_logits(moe(_tokens()), dense(_tokens()), DENSE)

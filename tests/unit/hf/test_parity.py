"""Imported HF checkpoints reproduce transformers' logits, loss and one SGD step; exports reload identically."""

import pytest
import torch
import torch.nn.functional as F

from automoe.hf import load_hf_checkpoint, save_hf_checkpoint
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import CASES, hf_config

pytest.importorskip("transformers")

V = 97


def _assert_parity(got: torch.Tensor, ref: torch.Tensor, case: str, *, passes: int = 1) -> None:
    """Two implementations of the same fp32 math: equal up to reordering error over `passes` sweeps through the
    layers (4 chained reductions each: attention scores, values, FFN in, FFN out; plus the head), each reduction
    at most as long as the widest contraction."""
    c = hf_config(case)
    widest = max(c.hidden_size, c.intermediate_size, 24)  # 24 = the test sequence length
    assert_close_rounding(got, ref, terms=widest, depth=passes * (4 * c.num_hidden_layers + 1))


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(seed))


def _loss(logits_BSV: torch.Tensor, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, averaged over the B*(S-1) predictions (the HF causal-LM loss)."""
    return F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V), tokens_BS[:, 1:].reshape(-1))


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_logits_and_loss(case, saved):
    hf, path = saved(case)
    cfg, ours = load_hf_checkpoint(path, build_model=True)
    ours.eval()
    tokens = _tokens()
    shifted_BS = torch.arange(24).expand(2, 24) + 90  # beyond YaRN's original 32 positions
    with torch.no_grad():
        ref = hf(tokens, labels=tokens)
        got = ours(tokens)
        ref_shifted = hf(tokens, position_ids=shifted_BS).logits
        got_shifted = ours(tokens, positions_BS=shifted_BS)
    assert ref.logits.abs().max() > 1.0  # a non-degenerate model
    _assert_parity(got, ref.logits, case)
    _assert_parity(got_shifted, ref_shifted, case)
    _assert_parity(_loss(got, tokens), ref.loss, case, passes=2)  # + log-sum-exp over the vocabulary


def test_yarn_settings_are_live(saved):
    """Dropping the imported YaRN settings changes the logits: the parity above depends on them."""
    import dataclasses

    from automoe.models import Transformer

    hf, path = saved("deepseek_v3")
    cfg, state = load_hf_checkpoint(path)
    assert (cfg.rope_scaling, cfg.yarn_factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim) == (
        "yarn",
        4.0,
        0.707,
        1.0,
    )
    plain = Transformer(dataclasses.replace(cfg, rope_scaling=None)).eval()
    plain.load_state_dict(state)
    tokens = _tokens()
    with torch.no_grad():
        assert (plain(tokens) - hf(tokens).logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_export_reloads_in_transformers_bit_identically(case, saved, tmp_path):
    tf = pytest.importorskip("transformers")
    hf, path = saved(case)
    cfg, ours = load_hf_checkpoint(path, build_model=True)
    family = "deepseek_v3" if case.startswith("deepseek") else case
    files = save_hf_checkpoint(ours, cfg, tmp_path, family=family, max_shard_size="60KB")
    assert "model.safetensors.index.json" in files and len(files) > 3
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref_sd, new_sd = hf.state_dict(), reloaded.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    for key in ref_sd:
        assert_equal(new_sd[key], ref_sd[key], msg=key)
    tokens = _tokens()
    with torch.no_grad():
        assert_equal(reloaded(tokens).logits, hf(tokens).logits)  # same weights, same code, same process


@pytest.mark.parametrize("case", CASES)
def test_one_sgd_step_after_import_matches(case, saved):
    """Same loss, same SGD step on both sides -> the same next logits (gradients agree through routing)."""
    from tests.unit.hf.conftest import hf_model

    hf = hf_model(case).train()  # a fresh copy: the module-scoped one stays untouched
    _, path = saved(case)
    _, ours = load_hf_checkpoint(path, build_model=True)
    ours.train()
    tokens, probe = _tokens(1), _tokens(2)
    for model, logits_of in ((hf, lambda t: hf(t).logits), (ours, ours)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        _loss(logits_of(tokens), tokens).backward()
        opt.step()
    hf.eval(), ours.eval()
    with torch.no_grad():
        ref, got = hf(probe).logits, ours(probe)
        moved = (ref - hf_model(case)(probe).logits).abs().max()
    assert moved > 1e-2  # the step really changed the model
    _assert_parity(got, ref, case, passes=3)  # forward, backward, then the probe forward

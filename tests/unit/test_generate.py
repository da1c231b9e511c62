"""automoe.generate: sampling filters, EOS handling, argument checks, and the command on a trained checkpoint."""

import pytest
import torch

from automoe.config.model import ModelConfig
from automoe.config.moe import MoEConfig
from automoe.generate import filter_logits, generate
from automoe.models import Transformer
from tests.tolerance import assert_equal


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_inter_dim=64,
        max_seq_len=32,
        moe=MoEConfig(moe_inter_dim=16, num_experts=4, num_activated_experts=2, num_shared_experts=1),
        **changes,
    )
    model = Transformer(cfg)
    model.init_weights()
    return model.eval()


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: (out > float("-inf")).squeeze(0).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits[:, [3, 2, 1, 0]], top_p=0.5)) == [False, False, False, True]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_sampling_is_seeded_and_the_cache_changes_no_token(attention):
    extra = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    model = _model(**(extra if attention == "mla" else {}))
    prompt = torch.tensor([[1, 2, 3]])
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, prompt, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, prompt, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.shape == (1, 13)
    assert_equal(a, b)


def test_stops_at_eos_and_pads_finished_rows_with_it():
    model = _model()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = generate(model, prompt, max_new_tokens=8)
    eos = int(free[0, 4])  # the second token row 0 generates
    out = generate(model, prompt, max_new_tokens=8, eos_id=eos)
    assert out[0, 4] == eos and (out[0, 4:] == eos).all()
    if (out[1, 3:] != eos).all():
        assert out.shape[1] == 3 + 8


def test_refuses_a_sequence_longer_than_the_model():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(_model(), torch.tensor([[1] * 30]), max_new_tokens=5)

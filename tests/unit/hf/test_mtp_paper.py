"""DeepSeek-V3 multi-token prediction against the report's formula (tests/unit/hf/mtp_reference.py), a second
reference beside transformers' `MtpModel` (test_mtp.py): a tiny DeepSeek-V3 (MLA with compressed queries, YaRN)
with D = 2 MTP depths in the published layout; each depth's logits, the chaining of depth 1's output into depth 2
and the loss lambda / D * sum_k CE_k / S equal the report's."""

from __future__ import annotations

import pytest
import torch

from automoe.hf import load_hf_checkpoint
from automoe.models.mtp import mtp_ce_sum
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import hf_config
from tests.unit.hf.mtp_reference import (
    hf_block,
    paper_mtp_logits,
    paper_mtp_loss,
    published_state,
    randomize,
    write_checkpoint,
)

tf = pytest.importorskip("transformers")
S, D = 16, 2


def test_two_depths_match_the_report(tmp_path):
    from transformers.modeling_layers import MtpModel

    config = hf_config("deepseek_v3")
    config.num_mtp_layers = D
    torch.manual_seed(0)
    main = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(main)
    mtp = MtpModel(main, D).eval()
    randomize(mtp, skip=("embed_tokens", "shared_head"))
    state = published_state(main, mtp)
    path = write_checkpoint(state, main.config, tmp_path)

    cfg, ours = load_hf_checkpoint(path, build_model=True)
    assert cfg.mtp_layers == D and cfg.attention == "mla" and cfg.rope_scaling == "yarn"
    ours.eval()
    tokens = torch.randint(0, 97, (2, S + 1), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        out = main(inputs, output_hidden_states=True)
        h0 = out.hidden_states[-1]
        assert_equal(main.lm_head(h0), out.logits)  # h0 is what the head reads
        paper = paper_mtp_logits(
            h0_BSD=h0,
            tokens_BS=inputs,
            tensors=state,
            blocks=[hf_block(layer.mtp_block, main.model.rotary_emb) for layer in mtp.layers],
            num_layers=cfg.num_layers,
            eps=cfg.norm_eps,
        )
        _, got = ours(inputs, mtp=True)
    assert [t.shape[1] for t in got] == [S - 1, S - 2]
    # the main stack, D MTP blocks, eh_proj and the head; the longest sums run over the 2D inputs or the FFN
    terms = max(2 * config.hidden_size, config.intermediate_size, S)
    for k, (ref, mine) in enumerate(zip(paper, got), start=1):
        assert ref.abs().max() > 1.0
        assert_close_rounding(mine, ref, terms=terms, depth=4 * (cfg.num_layers + k) + 2, msg=f"depth {k}")
    # the loss on the same logits: trainer term coeff / D * mtp_ce_sum / (B * S) vs the report's, fp32 sums over
    # the B * (S - k) tokens and the 97-way log-sum-exp, terms of size loss / coeff
    coeff = cfg.mtp_loss_coeff
    ours_loss = coeff / D * mtp_ce_sum(got, labels) / labels.numel()
    expected = paper_mtp_loss(got, labels, coeff=coeff).float()
    assert expected > 0.1
    assert_close_rounding(ours_loss, expected, terms=labels.numel() + 97, depth=D + 1, scale=expected / coeff)

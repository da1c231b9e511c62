"""GLM-4.5's multi-token-prediction layer: a tiny GLM-4.5 checkpoint with its MTP layer in the published layout
(`model.layers.{L}.{enorm, hnorm, eh_proj, shared_head.*, embed_tokens}` + a GLM decoder layer: q/k/v biases, q/k
norm, partial RoPE, sigmoid-routed experts with a shared one) imports into `model.mtp` with every tensor written;
its MTP logits match transformers' `MtpModel` and the DeepSeek-V3 report's formula (tests/unit/hf/mtp_reference.py),
its loss matches the report's; export writes the layer back; a checkpoint that declares the layer without its
tensors (what transformers' `save_pretrained` writes) imports without MTP, one missing part of a held layer is named.
"""

from __future__ import annotations

import json

import pytest
import torch

from automoe.hf import load_hf_checkpoint, save_hf_checkpoint
from automoe.hf.checkpoint import load_hf_weights
from automoe.models import Transformer
from automoe.models.mtp import mtp_ce_sum
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import hf_config, hf_model
from tests.unit.hf.mtp_reference import (
    hf_block,
    paper_mtp_logits,
    paper_mtp_loss,
    published_state,
    randomize,
    write_checkpoint,
)

tf = pytest.importorskip("transformers")
S = 16


@pytest.fixture(scope="module")
def glm_mtp(tmp_path_factory):
    """(transformers main model, its MtpModel, checkpoint state, directory) of a GLM-4.5 with one MTP layer."""
    from transformers.modeling_layers import MtpModel

    main = hf_model("glm4_moe")
    assert main.config.num_mtp_layers == 1  # transformers' default for GLM-4.5
    torch.manual_seed(1)
    mtp = MtpModel(main, 1).eval()
    randomize(mtp, skip=("embed_tokens", "shared_head"))
    state = published_state(main, mtp)
    path = write_checkpoint(state, main.config, tmp_path_factory.mktemp("glm_mtp"))
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return main, mtp, state, path


def _tolerance_terms():
    c = hf_config("glm4_moe")
    # the main stack, the MTP block, eh_proj and the head; the longest sums run over the FFN width or the 2D inputs
    return dict(terms=max(2 * c.hidden_size, c.intermediate_size, S), depth=4 * (c.num_hidden_layers + 1) + 2)


def test_imported_mtp_matches_transformers_and_the_paper(glm_mtp):
    main, mtp, state, path = glm_mtp
    cfg, ours = load_hf_checkpoint(path, build_model=True)
    assert cfg.mtp_layers == 1 and ours.mtp is not None
    assert cfg.is_moe_layer(cfg.num_layers) and cfg.rope_dim == cfg.head_dim // 2  # routed, partial RoPE
    ours.eval()
    tokens = torch.randint(0, 97, (2, S + 1), generator=torch.Generator().manual_seed(2))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(S).expand(2, S)
    with torch.no_grad():
        out = main(inputs, output_hidden_states=True)
        h0 = out.hidden_states[-1]
        assert_equal(main.lm_head(h0), out.logits)  # h0 is what the head reads: the normalized representation
        via_tf = mtp._project_to_logits(
            mtp.forward_layer(0, h0[:, :-1], positions[:, 1:], None, input_ids=inputs[:, 1:])
        )
        (paper,) = paper_mtp_logits(
            h0_BSD=h0,
            tokens_BS=inputs,
            tensors=state,
            blocks=[hf_block(mtp.layers[0].mtp_block, main.model.rotary_emb)],
            num_layers=cfg.num_layers,
            eps=cfg.norm_eps,
        )
        logits, (got,) = ours(inputs, mtp=True)
    assert paper.abs().max() > 1.0 and (paper - out.logits[:, 1:]).abs().max() > 1.0  # not the main head's
    tol = _tolerance_terms()
    assert_close_rounding(logits, out.logits, **tol)
    assert_close_rounding(via_tf, paper, **tol)  # the two references agree
    assert_close_rounding(got, paper, **tol)
    # the loss on the same logits: the trainer adds coeff / D * mtp_ce_sum / (B * S) (automoe/train/loss.py); fp32
    # sums over the B * (S - 1) tokens and the 97-way log-sum-exp vs the report's mean in fp64, terms of size loss/coeff
    coeff = cfg.mtp_loss_coeff
    ours_loss = coeff * mtp_ce_sum([got], labels) / labels.numel()
    expected = paper_mtp_loss([got], labels, coeff=coeff).float()
    assert expected > 0.1
    assert_close_rounding(ours_loss, expected, terms=labels.numel() + 97, depth=2, scale=expected / coeff)


def test_every_tensor_is_written_and_export_writes_the_layer_back(glm_mtp, tmp_path):
    _, _, _, path = glm_mtp
    cfg, state = load_hf_checkpoint(path)
    torch.manual_seed(3)
    model = Transformer(cfg)
    model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_hf_weights(model, path)
    assert report.not_written == []
    kept = [k for k, v in model.state_dict().items() if torch.equal(v, before[k]) and ".adaptive" not in k]
    assert kept == [], kept  # no tensor keeps its initial value, the MTP layer's included
    assert any(k.startswith("mtp.depths.0.block.moe.experts") for k in state)

    save_hf_checkpoint(state, cfg, tmp_path, family="glm4_moe", expert_layout="fused", max_shard_size="100KB")
    written = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    source = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert written.keys() == source.keys()  # the embedding and head copies included
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    again_cfg, again = load_hf_checkpoint(tmp_path)
    assert again_cfg == cfg and again.keys() == state.keys()
    for key in state:
        assert_equal(again[key], state[key], msg=key)


def test_declared_layer_without_tensors_imports_without_mtp(saved, glm_mtp, tmp_path):
    """transformers' save_pretrained keeps num_nextn_predict_layers=1 and writes no MTP tensors: no MTP, and
    export says so; a held layer missing one tensor is refused naming it."""
    _, path = saved("glm4_moe")
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    cfg, state = load_hf_checkpoint(path)
    assert cfg.mtp_layers == 0 and not any(k.startswith("mtp.") for k in state)
    save_hf_checkpoint(state, cfg, tmp_path / "out", family="glm4_moe")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0

    main, _, full, _ = glm_mtp
    L = main.config.num_hidden_layers
    gone = f"model.layers.{L}.self_attn.k_norm.weight"
    partial = write_checkpoint(
        {k: v for k, v in full.items() if k != gone}, main.config, tmp_path / "partial"
    )
    with pytest.raises(ValueError, match=rf"lacks 1 tensors: {gone}"):
        load_hf_checkpoint(partial)

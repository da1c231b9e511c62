"""The first loss after an import tells the truth (issue 16, item 4): after `hf.init_from` the trainer logs step 1's
loss next to ln(V) and stops when the loaded model is no better than random (overridable), and the loader names
any parameter it did not write.

A tiny model is trained here on the synthetic Markov data until it is clearly better than random, exported as a
Qwen3-MoE HF checkpoint, and fine-tuned from: as is, with its experts replaced by random tensors, and without them.
"""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from automoe.hf import load_hf_weights, save_hf_checkpoint
from automoe.models import Transformer
from automoe.parallel import DistEnv
from automoe.train import build_trainer, read_metrics
from automoe.train.first_loss import MARGIN_NATS, FirstLossError, check_first_loss
from tests.unit.train.conftest import make_job

# SMALL_JOB's model (vocab 35, 2 MoE layers of 4 experts) in a shape Qwen3-MoE can hold
QWEN3_SHAPE = (
    "model.moe.num_shared_experts=0",
    "model.moe.gate_bias_update_factor=0.0",
    "model.qk_norm=true",
    "model.num_dense_layers=0",
)
LN_V = math.log(35)


@pytest.fixture(scope="module")
def trained_hf(tmp_path_factory):
    """An HF dir holding a model trained to well below ln(35) - 1 (the synthetic chain allows ln 4)."""
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    root = tmp_path_factory.mktemp("first_loss")
    cfg = make_job(root / "pretrain", *QWEN3_SHAPE, "train.steps=20", "optim.lr=2e-2", "train.val_interval=0")
    trainer = build_trainer(cfg, env)
    trainer.fit()
    last = read_metrics(root / "pretrain" / "metrics.jsonl")[-1]["loss"]
    assert last < LN_V - MARGIN_NATS - 0.3, (
        last
    )  # the fixture is what the test needs: clearly better than random
    save_hf_checkpoint(trainer.model, cfg.model, root / "hf", family="qwen3_moe")
    return root / "hf"


def _with_experts(src, dst, replace):
    """A copy of HF dir `src` whose routed-expert tensors go through `replace(name, tensor)` (None drops one)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        new = replace(name, t) if ".experts." in name else t
        if new is not None:
            out[name] = new.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _finetune(tmp_path, hf_dir, *overrides):
    return make_job(
        tmp_path, *QWEN3_SHAPE, f"hf.init_from={hf_dir}", "train.steps=2", "train.val_interval=0", *overrides
    )


def test_a_good_import_logs_its_first_loss_next_to_ln_v(trained_hf, tmp_path, env, caplog):
    with caplog.at_level(logging.INFO, logger="automoe"):
        build_trainer(_finetune(tmp_path, trained_hf), env).fit()
    first = read_metrics(tmp_path / "metrics.jsonl")[0]["loss"]
    assert first < LN_V - MARGIN_NATS
    assert (
        f"first step after loading hf.init_from={trained_hf}: loss {first:.4f}, ln(vocab_size=35) = "
        f"{LN_V:.4f}" in caplog.text
    )


def test_random_experts_stop_the_run_with_the_loss_and_ln_v_then_the_override_proceeds(
    trained_hf, tmp_path, env, caplog
):
    g = torch.Generator().manual_seed(0)
    garbage = _with_experts(
        trained_hf,
        tmp_path / "hf_random_experts",
        lambda name, t: torch.randn(t.shape, generator=g, dtype=t.dtype),
    )
    trainer = build_trainer(_finetune(tmp_path / "guarded", garbage), env)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FirstLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert f"first step after loading hf.init_from={garbage}: loss " in message
    assert f"ln(vocab_size=35) = {LN_V:.4f}" in message and "no better than random" in message
    assert "train.first_loss_guard=false" in message
    loss = float(message.split(": loss ")[1].split(",")[0])
    assert loss >= LN_V - MARGIN_NATS
    for key, value in trainer.model.state_dict().items():  # refused before the optimizer step
        assert torch.equal(value, before[key]), key
    assert not read_metrics(tmp_path / "guarded" / "metrics.jsonl")  # nothing logged, nothing saved
    with caplog.at_level(logging.INFO, logger="automoe"):
        build_trainer(_finetune(tmp_path / "override", garbage, "train.first_loss_guard=false"), env).fit()
    assert [r["step"] for r in read_metrics(tmp_path / "override" / "metrics.jsonl")] == [1, 2]
    assert "NOT better than random; training anyway (train.first_loss_guard=false)" in caplog.text


def test_missing_experts_are_refused_by_the_loader_naming_them(trained_hf, tmp_path, env):
    missing = _with_experts(trained_hf, tmp_path / "hf_no_experts", lambda name, t: None)
    with pytest.raises(ValueError, match=r"lacks 24 tensors: model\.layers\.0\.mlp\.experts\.0\."):
        build_trainer(_finetune(tmp_path / "run", missing), env)


def test_loader_reports_every_parameter_it_did_not_write(trained_hf):
    from automoe.hf import HFCheckpoint

    cfg = HFCheckpoint(trained_hf).cfg
    model = Transformer(cfg)
    model.init_weights()
    assert load_hf_weights(model, trained_hf).not_written == []
    # a parameter the checkpoint plan never sees (hidden from the state dict) keeps its init and is named
    block = model.layers["1"]
    block.extra_scale = torch.nn.Parameter(torch.ones(3))
    block.register_state_dict_post_hook(
        lambda module, sd, prefix, meta: sd.__delitem__(prefix + "extra_scale")
    )
    assert load_hf_weights(model, trained_hf).not_written == ["layers.1.extra_scale"]


def test_the_rule_and_its_message():
    ok = check_first_loss(2.0, 35, source="hf.init_from=x", enabled=True)
    assert ok.startswith("first step after loading hf.init_from=x: loss 2.0000, ln(vocab_size=35) = 3.5553")
    with pytest.raises(FirstLossError, match=r"did not write 2 tensors: a\.w, b\.w"):
        check_first_loss(LN_V - MARGIN_NATS, 35, source="x", enabled=True, not_loaded=["a.w", "b.w"])
    assert "training anyway" in check_first_loss(15.0, 35, source="x", enabled=False)
    assert check_first_loss(float("nan"), 35, source="x", enabled=True)  # NaN: train.nan_policy decides

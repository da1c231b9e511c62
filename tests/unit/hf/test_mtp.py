"""DeepSeek-V3 multi-token prediction: a tiny DeepSeek-V3 checkpoint with its MTP layer (written in the published
layout, `model.layers.{L}.{enorm,hnorm,eh_proj,shared_head.*,embed_tokens,...}`) imports into `model.mtp`, whose
logits match transformers' MTP module (`MtpModel`, the paper's MTP module) on the main model's hidden states; the
export writes the layer back; the MTP loss trains it; off by default."""

from __future__ import annotations

import json

import pytest
import torch

from automoe.config.model import ModelConfig
from automoe.hf import load_hf_checkpoint, save_hf_checkpoint
from automoe.hf.safetensors_io import ShardedWriter
from automoe.models import Transformer
from automoe.models.mtp import mtp_ce_sum
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import hf_config

tf = pytest.importorskip("transformers")
S = 16


def _randomize(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(skip):
                continue
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """(transformers main model, its MtpModel, directory of both in the DeepSeek-V3 layout)."""
    from transformers.modeling_layers import MtpModel

    config = hf_config("deepseek_v3")
    config.num_mtp_layers = 1
    torch.manual_seed(0)
    main = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(main)
    mtp = MtpModel(main, 1).eval()
    _randomize(mtp, skip=("embed_tokens", "shared_head"))
    L = config.num_hidden_layers
    state = dict(main.state_dict())
    for key, value in mtp.state_dict().items():
        if key.startswith(("embed_tokens", "shared_head")):
            continue
        key = key.replace("layers.0.", f"model.layers.{L}.").replace("mtp_block.", "")
        state[key.replace("post_norm", "shared_head.norm")] = value
    state[f"model.layers.{L}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
    state[f"model.layers.{L}.shared_head.head.weight"] = state["lm_head.weight"]
    path = tmp_path_factory.mktemp("dsv3_mtp")
    writer = ShardedWriter(path, max_shard_bytes=100_000)
    writer.add_all((k, v.clone()) for k, v in state.items())
    writer.close()
    main.config.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return main, mtp, path


def test_imported_mtp_head_matches_transformers(mtp_checkpoint):
    main, mtp, path = mtp_checkpoint
    cfg, ours = load_hf_checkpoint(path, build_model=True)
    assert cfg.mtp_layers == 1 and ours.mtp is not None
    ours.eval()
    tokens = torch.randint(0, 97, (2, S), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(S).expand(2, S)
    with torch.no_grad():
        out = main(tokens, output_hidden_states=True)
        h = out.hidden_states[-1]  # the normalized final hidden state
        hidden = mtp.forward_layer(0, h[:, :-1], positions[:, 1:], None, input_ids=tokens[:, 1:])
        ref = mtp._project_to_logits(hidden)
        logits, (got,) = ours(tokens, mtp=True)
    assert ref.abs().max() > 1.0
    c = hf_config("deepseek_v3")
    depth = 4 * (c.num_hidden_layers + 1) + 2  # the main stack, the MTP block, eh_proj and the head
    assert_close_rounding(logits, out.logits, terms=max(c.hidden_size, c.intermediate_size, S), depth=depth)
    assert_close_rounding(got, ref, terms=2 * c.hidden_size, depth=depth)


def test_export_writes_the_mtp_layer_back(mtp_checkpoint, tmp_path):
    _, _, path = mtp_checkpoint
    cfg, state = load_hf_checkpoint(path)
    save_hf_checkpoint(
        state, cfg, tmp_path, family="deepseek_v3", expert_layout="fused", max_shard_size="100KB"
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    source = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert index.keys() == source.keys()  # the duplicated embedding and head included
    again_cfg, again = load_hf_checkpoint(tmp_path)
    assert again_cfg == cfg and again.keys() == state.keys()
    for key in state:
        assert_equal(again[key], state[key], msg=key)


def test_mtp_is_off_by_default_and_its_loss_trains_it():
    assert ModelConfig().mtp_layers == 0 and Transformer(ModelConfig(num_layers=1)).mtp is None
    cfg = ModelConfig(
        vocab_size=97, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mtp_layers=2, max_seq_len=32
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, 97, (2, S + 1), generator=torch.Generator().manual_seed(2))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits, mtp_logits = model(inputs, mtp=True)
    assert [t.shape[1] for t in mtp_logits] == [S - 1, S - 2]
    # depth k at position i predicts token i + k + 1: the labels shifted by k
    manual = sum(
        torch.nn.functional.cross_entropy(lg.flatten(0, 1), labels[:, k:].flatten(), reduction="sum")
        for k, lg in enumerate(mtp_logits, start=1)
    )
    loss = mtp_ce_sum(mtp_logits, labels)
    assert_close_rounding(loss, manual, terms=2 * S, depth=2)
    loss.backward()
    assert model.mtp.depths["1"].eh_proj.weight.grad.abs().sum() > 0
    assert model.layers["0"].attention.q_proj.weight.grad.abs().sum() > 0  # the main stack learns from it too


def test_trainer_runs_the_mtp_objective(tmp_path):
    """model.mtp_layers=1 through build_trainer: the step's loss is CE + coeff * MTP CE, and it falls."""
    from automoe.parallel import DistEnv
    from automoe.train import build_trainer, read_metrics
    from tests.unit.train.conftest import make_job

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg = make_job(tmp_path, "model.mtp_layers=1", "train.steps=8", "optim.lr=1e-2", "train.val_interval=8")
    trainer = build_trainer(cfg, env)
    assert trainer.model.mtp is not None
    trainer.fit()
    losses = [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses


def test_pipeline_parallelism_refuses_mtp():
    from automoe.config.parallel import ParallelConfig
    from automoe.parallel.pipeline import check_pipeline

    with pytest.raises(ValueError, match=r"model\.mtp_layers=1 with parallel\.pp=2 is not supported"):
        check_pipeline(
            ModelConfig(num_layers=4, mtp_layers=1), ParallelConfig(pp=2, fsdp=False), num_micro_batches=4
        )

"""Every tensor is accounted for (missing / unexpected / misshaped keys are named), and expert-range imports read
exactly their experts' tensors, also into a model whose experts are sharded over 2 EP ranks."""

import json
import shutil

import pytest
import torch

from automoe.hf import HFCheckpoint, hf_tensors, load_hf_checkpoint, load_hf_into_model
from automoe.hf.safetensors_io import ShardedWriter
from tests.tolerance import assert_close_rounding, assert_equal
from tests.unit.hf.conftest import hf_config

pytest.importorskip("transformers")

MOE = "model.layers.1.block_sparse_moe."


def _rewrite(src, dst, edit):
    """Copy the HF checkpoint at src to dst with its tensors passed through edit(dict) (sharded again)."""
    cfg, ours = load_hf_checkpoint(src, build_model=True)
    tensors = dict(hf_tensors(ours, cfg, family="mixtral"))
    edit(tensors)
    writer = ShardedWriter(dst, max_shard_bytes=50_000)
    writer.add_all(tensors.items())
    writer.close()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop(MOE + "experts.3.w2.weight"),
            r"lacks 1 tensors: " + MOE + r"experts\.3\.w2\.weight",
        ),
        (
            lambda t: t.__setitem__(MOE + "experts.4.w1.weight", torch.zeros(48, 64)),
            r"no automoe counterpart: " + MOE + r"experts\.4\.w1\.weight",
        ),
        (
            lambda t: t.__setitem__(MOE + "experts.1.w3.weight", torch.zeros(47, 64)),
            MOE + r"experts\.1\.w3\.weight \[47, 64\] \(expected \[48, 64\]\)",
        ),
        (
            lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)),
            r"self_attn\.k_proj\.weight \[16, 64\] \(expected \[32, 64\]\)",
        ),
    ],
    ids=["missing-expert", "extra-expert", "misshaped-expert", "misshaped-dense"],
)
def test_unaccounted_tensors_raise_naming_the_key(saved, tmp_path, edit, message):
    _, src = saved("mixtral")
    path = _rewrite(src, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(path)


def test_unchanged_rewrite_loads(saved, tmp_path):
    """The rewrite helper itself produces a valid checkpoint (so the failures above come from the edits)."""
    _, src = saved("mixtral")
    _, state = load_hf_checkpoint(_rewrite(src, tmp_path / "ok", lambda t: None))
    _, ref = load_hf_checkpoint(src)
    for k in ref:
        assert_equal(state[k], ref[k], msg=k)  # the same bytes read back


def test_mtp_layers_are_accounted_for_but_not_imported(saved, tmp_path):
    """DeepSeek-V3 checkpoints carry the MTP module as layer num_layers; other unknown keys still fail."""
    from safetensors.torch import save_file

    _, src = saved("deepseek_v3")
    dst = tmp_path / "mtp"
    shutil.copytree(src, dst)
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(4, 4)}, str(dst / "mtp.safetensors"))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.3.eh_proj.weight"] = "mtp.safetensors"
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg, state = load_hf_checkpoint(dst)
    assert not any(k.startswith("layers.3.") for k in state) and cfg.num_layers == 3
    index["weight_map"]["model.layers.2.eh_proj.weight"] = "mtp.safetensors"
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.eh_proj\.weight"):
        load_hf_checkpoint(dst)


@pytest.mark.parametrize(
    "experts", [range(4, 6), (1, 6, 7), lambda e: e % 4 == 3], ids=["range", "ids", "predicate"]
)
def test_expert_selection_reads_only_those_experts(saved, experts):
    hf, path = saved("deepseek_v3")
    ckpt = HFCheckpoint(path)
    ids = [e for e in range(8) if e in experts] if not callable(experts) else [3, 7]
    state = ckpt.state_dict(experts=experts)
    read_experts = {
        int(k.split(".experts.")[1].split(".")[0]) for k in ckpt.reader.read_keys if ".experts." in k
    }
    assert read_experts == set(ids)
    hf_sd = hf.state_dict()
    for layer in (1, 2):
        fused_up_EHD = hf_sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"]  # HF in-memory: [E, 2F, D]
        fused_down_EDF = hf_sd[f"model.layers.{layer}.mlp.experts.down_proj"]
        # copies (gathered, transposed): bitwise
        assert_equal(state[f"layers.{layer}.moe.experts.w_up"], fused_up_EHD[ids].transpose(1, 2))
        assert_equal(state[f"layers.{layer}.moe.experts.w_down"], fused_down_EDF[ids].transpose(1, 2))
        bias = state[f"layers.{layer}.moe.gate.correction_bias"]
        assert_equal(bias, hf_sd[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"])


def _ep2_worker(rank, world_size, path, tokens):
    from torch.distributed.device_mesh import init_device_mesh

    from automoe.models import Transformer
    from automoe.parallel.expert_parallel import apply_ep

    cfg, _ = load_hf_checkpoint(path, experts=[])
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_ep(model, init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",)))
    model.to_empty(device="cpu")
    model.init_weights()
    read = load_hf_into_model(model, path)
    model.eval()
    with torch.no_grad():
        logits = model(tokens)
    local = model.layers["1"].moe.experts.w_up.to_local().clone()
    return {"logits": logits, "read": read, "w_up_local": local}


@pytest.mark.distributed
def test_ep2_load_into_sharded_model_reads_own_experts_and_matches_transformers(saved):
    from tests.distributed.spawn import run_distributed

    hf, path = saved("deepseek_v3")
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits
    _, full = load_hf_checkpoint(path)
    results = run_distributed(_ep2_worker, 2, str(path), tokens)
    for rank, res in enumerate(results):
        own = set(range(4 * rank, 4 * rank + 4))
        read = {int(k.split(".experts.")[1].split(".")[0]) for k in res["read"] if ".experts." in k}
        assert read == own
        assert_equal(res["w_up_local"], full["layers.1.moe.experts.w_up"][4 * rank : 4 * rank + 4])  # a copy
        # our EP model vs transformers: reordering error over 4 reductions per layer plus the head, each at most
        # the widest contraction (as in test_parity)
        c = hf_config("deepseek_v3")
        assert_close_rounding(
            res["logits"],
            ref,
            terms=max(c.hidden_size, c.intermediate_size, 16),
            depth=4 * c.num_hidden_layers + 1,
        )


def test_adaptive_bias_rule_state_is_training_state_not_hf_tensors(saved):
    """`bias_update_rule=adaptive` and `bias_update_drift` add checkpointed step/sign/velocity buffers to each MoE
    layer: an HF import leaves them at their init (and does not name them as unwritten), an export leaves them out."""
    import dataclasses

    from automoe.hf.checkpoint import load_hf_weights
    from automoe.models.transformer import Transformer

    _, src = saved("deepseek_v3")
    cfg, ref = load_hf_checkpoint(src)
    cfg = dataclasses.replace(
        cfg,
        moe=dataclasses.replace(
            cfg.moe, gate_bias_update_factor=0.001, bias_update_rule="adaptive", bias_update_drift=0.02
        ),
    )
    model = Transformer(cfg)
    model.init_weights()
    assert any(k.endswith("bias_step_exponent") for k in model.state_dict())
    assert any(k.endswith("bias_velocity") for k in model.state_dict())
    report = load_hf_weights(model, src)
    assert report.not_written == []
    sd = model.state_dict()
    for k in ref:
        assert_equal(sd[k], ref[k], msg=k)
    exported = dict(hf_tensors(model, cfg, family="deepseek_v3"))
    assert not any("bias_step" in k or "bias_last" in k or "bias_velocity" in k for k in exported)

"""`recipes/finetune.py` under torchrun from a tiny random `transformers` Qwen3-MoE: the first step's loss is the
loss `transformers` computes on the same batch (EP=2 + FSDP2 over 2 ranks, and one process), ranks read only their
own experts, training runs, the export loads back in `transformers`, and a shape-changing override fails early."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
import yaml

from automoe.config.data import DataConfig
from automoe.data import StatefulLoader, build_datasets
from automoe.torchrun import torchrun_command
from automoe.train.metrics import read_metrics
from tests.integration.recipe import FAST, REPO, RecipeRun, check_ok
from tests.tolerance import rounding_atol

pytestmark = pytest.mark.integration
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
tf = pytest.importorskip("transformers")

STEPS = 3
EXPERT_KEYS_PER_LAYER = 8 * 3  # experts x (gate, up, down) projections


def hf_qwen3_moe():
    """A random fp32 Qwen3-MoE (2 MoE layers, 8 experts top-2) with weights big enough for decisive routing."""
    config = tf.Qwen3MoeConfig(
        vocab_size=97,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        num_hidden_layers=2,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.08 * torch.randn_like(p)
            )
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    hf_qwen3_moe().save_pretrained(path, max_shard_size="100KB")  # several shards + index
    return path


def run_finetune(nproc: int, output_dir, hf_dir, *overrides: str, timeout: float = 90) -> RecipeRun:
    cmd = torchrun_command(
        nproc,
        REPO / "recipes" / "finetune.py",
        *FAST,
        "data.synthetic_vocab_size=64",  # token ids stay below the HF vocabulary (97)
        f"train.steps={STEPS}",
        "optim.warmup_steps=1",
        "optim.lr=3e-3",
        f"hf.init_from={hf_dir}",
        "train.first_loss_guard=false",  # the checkpoint is random on purpose: no better than ln(V) at step 1
        f"output_dir={output_dir}",
        *overrides,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return RecipeRun(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start)


def first_batch_loss(model, output_dir) -> float:
    """Mean next-token CE of `model` (transformers) over the run's first global batch, from its saved config."""
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    train_ds, _ = build_datasets(DataConfig(**saved["data"]))
    gbs = saved["train"]["global_batch_size"]
    loader = StatefulLoader(
        train_ds,
        global_batch_size=gbs,
        micro_batch_size=gbs,
        dp_rank=0,
        dp_size=1,
        seed=saved["data"]["seed"],
        shuffle=saved["data"]["shuffle"],
    )
    (batch,) = loader.next_step()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).double(), batch["labels"].flatten()).item()


def check_run(run: RecipeRun, output_dir, hf_dir) -> list[dict]:
    check_ok(run)
    records = read_metrics(output_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    reference = first_batch_loss(
        tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), output_dir
    )
    # our (EP/FSDP) model vs transformers on the same weights and batch: reordering error along 4 reductions per
    # layer (2 layers), the head and the CE's log-sum-exp, the longest being the mean over the global batch's tokens
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    tokens = saved["train"]["global_batch_size"] * saved["data"]["seq_len"]
    atol = rounding_atol(torch.float32, terms=max(tokens, 97), depth=4 * 2 + 2, scale=reference)
    assert records[0]["loss"] == pytest.approx(reference, abs=atol)
    assert all(r["grad_norm"] > 0 and not r["skipped"] for r in records)
    return records


@pytest.mark.timeout(120)
def test_ep2_fsdp_first_loss_matches_transformers_and_ranks_read_own_experts(hf_dir, tmp_path):
    out = tmp_path / "ep2"
    run = run_finetune(2, out, hf_dir, "parallel=ep2", "parallel.fsdp=true")
    check_run(run, out, hf_dir)
    # rank 0 logs how many HF tensors it read: every dense tensor, and its 4 of the 8 experts in each layer
    total = len(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"])
    own = total - 2 * EXPERT_KEYS_PER_LAYER // 2
    assert f"initialized from HF checkpoint {hf_dir} ({own} tensors read on rank 0)" in run.output, (
        run.output[-3000:]
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["moe"]["num_experts"] == 8 and saved["model"]["qk_norm"] is True  # from config.json


@pytest.mark.timeout(120)
def test_single_process_first_loss_matches_and_export_loads_in_transformers(hf_dir, tmp_path):
    out = tmp_path / "one"
    run = run_finetune(
        1, out, hf_dir, "parallel=single", "model.moe.aux_loss_coeff=0.0", f"hf.export_to={out}/hf"
    )
    check_run(run, out, hf_dir)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["moe"]["aux_loss_coeff"] == 0.0  # a model.* override on top of config.json
    before = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    after = tf.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    unchanged = [k for k, v in after.state_dict().items() if torch.equal(v, before.state_dict()[k])]
    assert not [k for k in unchanged if ".experts." not in k]  # every dense tensor was trained
    assert first_batch_loss(after, out) < first_batch_loss(before, out)  # 3 steps lowered the loss


@pytest.mark.timeout(60)
def test_shape_changing_model_override_fails_before_training(hf_dir, tmp_path):
    run = run_finetune(1, tmp_path, hf_dir, "parallel=single", "model.moe.num_experts=4", timeout=50)
    assert run.returncode != 0
    assert "model.moe.num_experts=4 (config.json gives 8)" in run.output, run.output[-3000:]
    assert not (tmp_path / "metrics.jsonl").exists()


# ---- a second family through the same recipe: Qwen2-MoE (gated shared expert, q/k/v biases) ----
def hf_qwen2_moe():
    """A random fp32 Qwen2-MoE (2 MoE layers, 8 experts top-2, a sigmoid-gated shared expert, q/k/v biases)."""
    config = tf.Qwen2MoeConfig(
        vocab_size=97,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_hidden_layers=2,
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.08 * torch.randn_like(p)
            )
    return model


@pytest.mark.timeout(120)
def test_qwen2_moe_ep2_fsdp_fine_tune_matches_transformers_and_exports(tmp_path):
    """One new family at EP=2 + FSDP2 (each further family would add ~25 s of torchrun here; the others are
    covered by the one-process parity, SGD-step and EP=2 import tests in tests/unit/hf)."""
    hf_dir = tmp_path / "qwen2_moe"
    hf_qwen2_moe().save_pretrained(hf_dir, max_shard_size="100KB")
    out = tmp_path / "ep2"
    run = run_finetune(2, out, hf_dir, "parallel=ep2", "parallel.fsdp=true", f"hf.export_to={out}/hf")
    check_run(run, out, hf_dir)
    total = len(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"])
    own = total - 2 * EXPERT_KEYS_PER_LAYER // 2
    assert f"initialized from HF checkpoint {hf_dir} ({own} tensors read on rank 0)" in run.output, (
        run.output[-3000:]
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert (
        saved["qkv_bias"],
        saved["moe"]["shared_expert_gate"],
        saved["moe"]["shared_expert_inter_dim"],
    ) == (
        True,
        True,
        40,
    )
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "qwen2_moe"
    before = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    after = tf.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    unchanged = [k for k, v in after.state_dict().items() if torch.equal(v, before.state_dict()[k])]
    assert not [k for k in unchanged if ".experts." not in k]  # biases and the shared-expert gate trained too
    assert first_batch_loss(after, out) < first_batch_loss(before, out)  # 3 steps lowered the loss


# ---- GPT-OSS through the same recipe: fused interleaved experts with biases, sinks, sliding windows, YaRN ----
def hf_gpt_oss():
    """A random fp32 GPT-OSS (2 MoE layers, 8 experts top-2, a window of 16 on layer 0, YaRN, clamp live)."""
    yarn = dict(
        rope_type="yarn",
        rope_theta=150000.0,
        factor=4.0,
        original_max_position_embeddings=32,
        beta_fast=32.0,
        beta_slow=1.0,
        truncate=False,
    )
    config = tf.GptOssConfig(
        vocab_size=97,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        num_hidden_layers=2,
        intermediate_size=48,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        swiglu_limit=1.0,
        rope_parameters=yarn,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.08 * torch.randn_like(p)
            )
    return model


@pytest.mark.timeout(120)
def test_gpt_oss_ep2_fsdp_fine_tune_matches_transformers_and_exports(tmp_path):
    """The family furthest from the rest at EP=2 + FSDP2: each rank reads its rows of the interleaved fused expert
    tensors and their biases; step 1's loss is transformers' (eager attention, the sinks' reference); the export
    reloads with every dense tensor (attention biases, sinks, router bias) trained and a lower loss."""
    hf_dir = tmp_path / "gpt_oss"
    hf_gpt_oss().save_pretrained(hf_dir, max_shard_size="100KB")
    out = tmp_path / "ep2"
    run = run_finetune(2, out, hf_dir, "parallel=ep2", "parallel.fsdp=true", f"hf.export_to={out}/hf")
    check_ok(run)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))

    def load(path):
        return tf.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    before, after = load(hf_dir), load(out / "hf")
    reference = first_batch_loss(before, out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    tokens = saved["train"]["global_batch_size"] * saved["data"]["seq_len"]
    atol = rounding_atol(torch.float32, terms=max(tokens, 97), depth=4 * 2 + 2, scale=reference)
    assert records[0]["loss"] == pytest.approx(reference, abs=atol)
    assert (saved["model"]["sliding_window"], saved["model"]["attention_sinks"]) == (16, True)
    unchanged = [k for k, v in after.state_dict().items() if torch.equal(v, before.state_dict()[k])]
    assert not unchanged, unchanged  # experts (fused rows and biases) included
    assert first_batch_loss(after, out) < reference  # 3 steps lowered the loss

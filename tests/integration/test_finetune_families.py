"""`recipes/finetune.py` under torchrun at EP=2 + FSDP2 (2 processes) for the issue-15 families that
test_finetune_recipe.py does not run (it runs Qwen3-MoE, Qwen2-MoE and GPT-OSS): OLMoE, and GLM-4.5 with its
multi-token-prediction layer. Each starts from a tiny random `transformers` checkpoint made here; step 1's loss is
transformers' loss on the same batch (for GLM-4.5 the main CE plus 0.3 x the MTP CE of transformers' `MtpModel`),
every step is finite, the export loads back in transformers (GLM's MTP layer through `MtpModel.from_pretrained`)
with every tensor trained and a lower loss, and imports again as the run's model, exporting once more to the same
tensors. One launch per family: the recipe fine-tunes one `hf.init_from`."""

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
from automoe.hf import config_from_hf, load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from automoe.hf.safetensors_io import SafetensorsReader
from automoe.torchrun import torchrun_command
from automoe.train.metrics import read_metrics
from tests.integration.recipe import FAST, REPO, RecipeRun, check_ok
from tests.tolerance import assert_equal, rounding_atol
from tests.unit.hf.conftest import hf_config
from tests.unit.hf.mtp_reference import published_state, randomize, write_checkpoint

pytestmark = pytest.mark.integration
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
tf = pytest.importorskip("transformers")

STEPS = 3
V = 97  # the tiny models' vocabulary (tests/unit/hf/conftest.py); the synthetic data stays below 64


def fine_tune_ep2(hf_dir, out, *overrides: str) -> RecipeRun:
    """torchrun --nproc-per-node 2 recipes/finetune.py hf.init_from=hf_dir parallel=ep2 parallel.fsdp=true, exporting
    to out/hf."""
    cmd = torchrun_command(
        2,
        REPO / "recipes" / "finetune.py",
        *FAST,
        "data.synthetic_vocab_size=64",
        f"train.steps={STEPS}",
        "optim.warmup_steps=1",
        "optim.lr=3e-3",
        f"hf.init_from={hf_dir}",
        "train.first_loss_guard=false",  # the checkpoint is random on purpose
        "parallel=ep2",
        "parallel.fsdp=true",
        f"output_dir={out}",
        f"hf.export_to={out}/hf",
        *overrides,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    return check_ok(RecipeRun(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start))


def first_batch(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of the run's first global batch, rebuilt from its saved data config."""
    saved = yaml.safe_load((out / "config.yaml").read_text())
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
    return batch["input_ids"], batch["labels"]


def records_of(out) -> list[dict]:
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(
        torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 and not r["skipped"] for r in records
    )
    return records


def loss_atol(reference: float, *, num_layers: int, tokens: int) -> float:
    # our EP/FSDP model vs transformers on the same weights and batch: reordering error along 4 reductions per layer,
    # the head and the CE's log-sum-exp, the longest being the mean over the global batch's tokens
    return rounding_atol(torch.float32, terms=max(tokens, V), depth=4 * num_layers + 2, scale=reference)


def assert_round_trips(export, family: str, again) -> None:
    """The export imports into automoe and exports again to the very same tensors under the same names."""
    cfg, state = load_hf_checkpoint(export)
    save_hf_checkpoint(state, cfg, again, family=family)
    first, second = SafetensorsReader(export), SafetensorsReader(again)
    keys = first.keys()  # SafetensorsReader.keys(): a set
    assert keys == second.keys()
    for key in keys:
        assert_equal(second.get(key), first.get(key), msg=key)


def untrained(before: torch.nn.Module, after: torch.nn.Module) -> list[str]:
    """Tensors the fine-tune left bitwise unchanged."""
    return [k for k, v in after.state_dict().items() if torch.equal(v, before.state_dict()[k])]


@pytest.mark.timeout(150)
def test_olmoe_ep2_fsdp_fine_tune_matches_transformers_and_exports(tmp_path):
    """OLMoE: q/k norms over the whole projection, q/k/v/o biases, softmax top-2 of 8 not renormalized; each rank
    reads only its 4 experts per layer."""
    config = hf_config("olmoe")
    torch.manual_seed(0)
    before = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(before, scale=0.08)
    hf_dir = tmp_path / "olmoe"
    before.save_pretrained(hf_dir, max_shard_size="100KB")  # one tensor per expert, several shards
    out = tmp_path / "ep2"
    run = fine_tune_ep2(hf_dir, out)
    records = records_of(out)

    inputs, labels = first_batch(out)

    def loss_of(model) -> float:
        with torch.no_grad():
            return F.cross_entropy(
                model(input_ids=inputs).logits.flatten(0, 1).double(), labels.flatten()
            ).item()

    reference = loss_of(before)
    atol = loss_atol(reference, num_layers=config.num_hidden_layers, tokens=labels.numel())
    assert records[0]["loss"] == pytest.approx(reference, abs=atol)
    total = len(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"])
    own = total - config.num_hidden_layers * 8 * 3 // 2  # half of each layer's 8 experts x (gate, up, down)
    assert f"initialized from HF checkpoint {hf_dir} ({own} tensors read on rank 0)" in run.output, (
        run.output[-3000:]
    )

    export = out / "hf"
    assert read_hf_config(export)["model_type"] == "olmoe"
    after = tf.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert untrained(before, after) == []  # every expert, bias and q/k norm trained
    assert loss_of(after) < reference  # 3 steps lowered the loss on the first batch
    assert config_from_hf(read_hf_config(export)) == config_from_hf(read_hf_config(hf_dir))  # the same model
    assert_round_trips(export, "olmoe", tmp_path / "again")


@pytest.mark.timeout(150)
def test_glm4_moe_with_mtp_ep2_fsdp_fine_tune_matches_transformers_and_exports(tmp_path):
    """GLM-4.5 (a dense layer, then routed layers with group-limited sigmoid routing, a shared expert, partial RoPE,
    q/k/v biases, q/k norm) with one MTP layer: imported as model.mtp_layers=1 (its experts sharded over EP like
    the main stack's), trained with the MTP loss, exported in the published layout."""
    from transformers.modeling_layers import MtpModel

    config = hf_config("glm4_moe")
    config.num_hidden_layers = 2  # the dense layer and one routed layer; the MTP layer is a third, routed
    torch.manual_seed(0)
    before = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(before, scale=0.08)
    mtp_before = MtpModel(before, 1).eval()
    randomize(mtp_before, skip=("embed_tokens", "shared_head"), scale=0.08)
    hf_dir = write_checkpoint(published_state(before, mtp_before), before.config, tmp_path / "glm")
    out = tmp_path / "ep2"
    fine_tune_ep2(hf_dir, out, "model.moe.gate_bias_update_factor=0.001")  # DeepSeek-V3's gamma: biases train
    records = records_of(out)
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert (saved["mtp_layers"], saved["mtp_loss_coeff"], saved["rope_dim"]) == (1, 0.3, 12)

    inputs, labels = first_batch(out)
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)

    def loss_of(main, mtp) -> float:
        """The run's objective by transformers: main CE + 0.3 x the MTP CE, each a mean over the batch's B x S
        labels (the MTP one has S - 1 per row: y_{i+1} after main position i)."""
        with torch.no_grad():
            out_ = main(input_ids=inputs, output_hidden_states=True)
            h = out_.hidden_states[-1][:, :-1]
            mtp_logits = mtp._project_to_logits(
                mtp.forward_layer(0, h, positions[:, 1:], None, input_ids=inputs[:, 1:])
            )
            ce = F.cross_entropy(out_.logits.flatten(0, 1).double(), labels.flatten())
            mtp_ce = F.cross_entropy(
                mtp_logits.flatten(0, 1).double(), labels[:, 1:].flatten(), reduction="sum"
            )
        return (ce + 0.3 * mtp_ce / labels.numel()).item()

    reference = loss_of(before, mtp_before)
    atol = loss_atol(reference, num_layers=config.num_hidden_layers + 1, tokens=labels.numel())
    assert records[0]["loss"] == pytest.approx(reference, abs=atol)

    export = out / "hf"
    written = SafetensorsReader(export).keys()
    assert {k for k in written if k.startswith("model.layers.2.")} >= {
        "model.layers.2.eh_proj.weight",
        "model.layers.2.shared_head.norm.weight",
        "model.layers.2.embed_tokens.weight",
        "model.layers.2.mlp.experts.7.down_proj.weight",
    }
    after = tf.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    # transformers' MtpModel reads layers 92 / 46 of the published GLM-4.5 checkpoints; here it is layer 2
    after._keys_to_ignore_on_load_unexpected = [r"model\.layers\.2\..*"]
    mtp_after = MtpModel.from_pretrained(after).eval()
    assert untrained(before, after) == []  # correction biases included
    assert untrained(mtp_before, mtp_after) == []  # the MTP layer trained
    assert loss_of(after, mtp_after) < reference
    cfg, _ = load_hf_checkpoint(export)
    assert cfg.mtp_layers == 1 and cfg == config_from_hf(read_hf_config(hf_dir))[0]
    assert_round_trips(export, "glm4_moe", tmp_path / "again")

"""From a run to a usable model (issue 12 §2-3), through the commands: `recipes/pretrain.py hf.export_to=` exports
the trained model (or refuses before training, naming the setting), `python -m automoe.evaluate` reproduces the run's
validation loss with bits per byte, `python -m automoe.generate` reads the checkpoint and the export alike, and
`recipes/finetune.py` names a missing `hf.init_from`, prints its composed model with `--cfg job` and refuses data
of another tokenizer than the checkpoint's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from automoe import evaluate, generate
from automoe.train.metrics import read_metrics
from tests.integration.recipe import PRETRAIN, REPO
from tests.tolerance import assert_close_rounding

pytestmark = pytest.mark.integration
FINETUNE = REPO / "recipes" / "finetune.py"
QUIET = [
    "logging.progress_bar=false",
    "logging.heatmap=false",
    "logging.loss_curve=false",
    "logging.wandb.mode=disabled",
]
RUN = [  # byte-level stdlib text, one process, validation over the whole split at the last step
    "parallel=single",
    "data.max_bytes=50000",
    "data.seq_len=64",
    "data.val_fraction=0.05",
    "train.steps=3",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.val_interval=3",
    "train.val_max_batches=null",
    "optim.warmup_steps=1",
    "checkpoint.interval=3",
    *QUIET,
]


def python(*argv, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True)
def one_thread():
    """In-process evaluate/generate on one intra-op thread, as the subprocesses (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-step run of the tiny model with a gated shared expert, exported as an HF directory."""
    out = tmp_path_factory.mktemp("use_model")
    proc = python(
        PRETRAIN, *RUN, "model.moe.shared_expert_gate=true", f"output_dir={out}", f"hf.export_to={out}/hf"
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def test_pretrain_export_writes_the_model_as_qwen2_moe(run):
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["vocab_size"] == 259
    assert (run / "hf" / "model.safetensors").is_file()


def test_an_export_no_family_expresses_is_refused_naming_each_reason():
    """What `recipes/pretrain.py hf.export_to=...` runs before training (`job_config`) for the default model."""
    from omegaconf import OmegaConf

    from automoe.config.model import ModelConfig
    from automoe.hf.finetune import export_family

    tiny = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "configs/model/tiny.yaml")
    )
    with pytest.raises(ValueError, match="no Hugging Face family can express this model") as info:
        export_family(None, None, OmegaConf.to_object(tiny))
    assert "qwen2_moe: ModelConfig.moe.shared_expert_gate=False" in str(info.value)
    assert "mixtral: ModelConfig.moe.num_shared_experts=1" in str(info.value)


def test_evaluate_reproduces_the_logged_validation_loss(run, tmp_path):
    evaluate.main([str(run), "--json", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    logged = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
    # the same micro-batch CE sums; the trainer adds them up in fp32, evaluate in fp64
    num_micro_batches = result["num_tokens"] // (2 * 64)
    assert_close_rounding(
        torch.tensor(result["loss"]), torch.tensor(logged), terms=num_micro_batches, scale=logged
    )
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert 0 < result["num_bytes"] <= result["num_tokens"]  # EOS labels are not bytes
    bits = result["loss"] * result["num_tokens"] / math.log(2)
    assert result["bits_per_byte"] == pytest.approx(bits / result["num_bytes"])


@pytest.mark.timeout(240)
def test_evaluate_under_torchrun_ep2_equals_one_process(run, tmp_path):
    """The checkpoint (trained in one process) resharded to EP=2 + FSDP2 over 2 ranks gives the same loss."""
    from automoe.torchrun import torchrun_command

    evaluate.main([str(run), "--json", str(tmp_path / "one.json")])
    cmd = torchrun_command(
        2, "-m", "automoe.evaluate", str(run), "parallel.ep=2", "--json", str(tmp_path / "ep2.json")
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "applied expert parallelism: ep=2" in proc.stderr
    one, ep2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ep2"))
    assert ep2["num_tokens"] == one["num_tokens"] and ep2["num_bytes"] == one["num_bytes"]
    # per-micro-batch CE sums in another grouping (2 ranks, then an all-reduce), in fp32 inside each forward
    num_micro_batches = one["num_tokens"] // (2 * 64)
    assert_close_rounding(
        torch.tensor(ep2["loss"]), torch.tensor(one["loss"]), terms=num_micro_batches, scale=one["loss"]
    )


def test_evaluate_reads_a_token_file_with_the_export_or_the_checkpoint_alike(run, tmp_path):
    from automoe.data.prepare import prepare_token_file

    (tmp_path / "c.txt").write_text((REPO / "automoe" / "generate.py").read_text()[:3000])
    prepare_token_file("text", str(tmp_path / "c.txt"), tmp_path / "bytes.bin")
    for name, model in (("ckpt", run), ("hf", run / "hf")):
        evaluate.main(
            [
                str(model),
                "--tokens",
                str(tmp_path / "bytes.bin"),
                "--seq-len",
                "64",
                "--json",
                str(tmp_path / f"{name}.json"),
            ]
        )
    ckpt, hf = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ckpt", "hf"))
    assert hf["num_tokens"] == ckpt["num_tokens"] and "bits_per_byte" in hf
    # the export holds the same numbers (the gated shared expert included): the same sums up to fp64 rounding
    assert_close_rounding(torch.tensor(hf["loss"]), torch.tensor(ckpt["loss"]), terms=2, scale=ckpt["loss"])


def test_generate_reads_the_checkpoint_and_its_export_alike(run, capsys, tmp_path):
    generate.main([str(run), "--prompt", "def ", "--max-new-tokens", "6", "--print-ids", "--eos-id", "-1"])
    from_checkpoint = capsys.readouterr().out.split()
    prompt = " ".join(str(b) for b in b"def ")
    generate.main([str(run / "hf"), "--prompt-ids", prompt, "--max-new-tokens", "6"])
    from_export = capsys.readouterr().out.split()
    assert from_checkpoint[:4] == prompt.split() and len(from_checkpoint) == 10
    assert from_export == from_checkpoint
    generate.main([str(run), "--prompt", "def ", "--max-new-tokens", "6"])
    assert capsys.readouterr().out.startswith("def ")  # decoded with the run's byte tokenizer
    from automoe.convert import hf_to_automoe

    hf_to_automoe(run / "hf", tmp_path / "converted", fmt="torch", max_seq_len=None)
    capsys.readouterr()
    generate.main([str(tmp_path / "converted"), "--prompt-ids", prompt, "--max-new-tokens", "6"])
    assert capsys.readouterr().out.split() == from_checkpoint


@pytest.mark.timeout(120)
def test_finetune_names_a_missing_init_from_and_prints_its_model(run):
    proc = python(FINETUNE, "parallel=single")
    assert proc.returncode == 1 and "hf.init_from is required" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    proc = python(FINETUNE, f"hf.init_from={run}/hf", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\nmodel:\n" in proc.stdout and "shared_expert_gate: true" in proc.stdout
    assert f"init_from: {run}/hf" in proc.stdout


@pytest.mark.timeout(120)
def test_finetune_refuses_data_of_another_tokenizer(run, tmp_path):
    from automoe.data.prepare import prepare_token_file
    from tests.unit.data.test_hf_tokenizer import make_tokenizer

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for f in (run / "hf").iterdir():
        (hf_dir / f.name).write_bytes(f.read_bytes())
    make_tokenizer(hf_dir, vocab_size=259)  # now the model comes with a BPE tokenizer of its vocabulary size
    (tmp_path / "c.txt").write_text("x = 1\n" * 200)
    prepare_token_file(
        "text", str(tmp_path / "c.txt"), tmp_path / "bytes.bin"
    )  # byte ids: the same vocab size
    data = ["data.source=tokens", f"data.path={tmp_path}/bytes.bin", "data.seq_len=64"]
    proc = python(
        FINETUNE, f"hf.init_from={hf_dir}", "parallel=single", *data, f"output_dir={tmp_path}/ft", *QUIET
    )
    assert proc.returncode == 1
    assert "is in the byte tokenizer (vocab 259), but hf.init_from=" in proc.stderr, proc.stderr[-3000:]

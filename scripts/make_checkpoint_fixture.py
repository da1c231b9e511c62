"""Write the committed compatibility checkpoint: a 2-step EP=2 run of a very small MoE, plus its step-3 loss.

    python scripts/make_checkpoint_fixture.py                  # writes tests/fixtures/checkpoint_v<N>/

`tests/integration/test_checkpoint_compat.py` resumes every `tests/fixtures/checkpoint_v*` with today's code and
must reproduce the recorded loss of step 3. Run this once per checkpoint format version, never to "fix" that test:
a fixture that no longer loads means users' old runs no longer load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from automoe.bench import cpu_model
from automoe.torchrun import torchrun_command
from automoe.train.checkpoint import FORMAT_VERSION
from automoe.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

NPROC = 2
SAVED_STEP = 2
# A model small enough that its checkpoint (weights + AdamW moments) is a few hundred KB; EP=2 over 2 ranks.
OVERRIDES = [
    "data=synthetic",
    "data.synthetic_num_tokens=20000",
    "data.seq_len=32",
    "data.synthetic_vocab_size=61",
    "model.vocab_size=64",
    "model.dim=16",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.ffn_inter_dim=32",
    "model.moe.moe_inter_dim=16",
    "model.moe.num_experts=4",
    "parallel=ep2",
    "train.steps=3",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.val_interval=0",
    "optim.warmup_steps=1",
    "logging.progress_bar=false",
    "logging.heatmap=false",
    "logging.wandb.mode=disabled",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "tests" / "fixtures" / f"checkpoint_v{FORMAT_VERSION}"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = torchrun_command(
            NPROC,
            REPO / "recipes" / "pretrain.py",
            *OVERRIDES,
            f"checkpoint.interval={SAVED_STEP}",
            "checkpoint.keep_last_n=0",
            f"output_dir={run_dir}",
        )
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        records = read_metrics(run_dir / "metrics.jsonl")
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        shutil.copytree(run_dir / "checkpoints" / f"step_{SAVED_STEP}", args.out / f"step_{SAVED_STEP}")
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        expected = {
            "format": FORMAT_VERSION,
            "nproc": NPROC,
            "saved_step": SAVED_STEP,
            "overrides": OVERRIDES,
            "next_step_loss": next(r["loss"] for r in records if r["step"] == SAVED_STEP + 1),
            "written_by": {"commit": commit, "torch": torch.__version__, "cpu": cpu_model()},
        }
        (args.out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(
        f"wrote {args.out} ({size / 1024:.0f} KB), step {SAVED_STEP + 1} loss {expected['next_step_loss']:.6f}"
    )


if __name__ == "__main__":
    main()

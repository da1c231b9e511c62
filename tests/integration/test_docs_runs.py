"""The README's and docs/checkpoints.md's recipe commands, run for real in the order written.

Each page's commands run one after another in a fresh working directory (so their relative `output_dir`s meet as
they would for a reader), scaled down: a small synthetic corpus and batch go first (a command's own values win),
and every step count of a command (`train.steps`, `train.stop_at_step`, intervals, `step_<N>` paths) is divided
by `SCALE`, so a 300-step run becomes 6 steps and "extend to 400" becomes 8. Every command must train (exit 0,
"finished step"): a command refused because an earlier one left checkpoints in its `output_dir`, or a resume
that finds its run already complete, fails the test. The `python -m automoe.<command>` lines between them (evaluate,
generate) run as written, `step_<N>` paths scaled, and must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.doc_commands import REPO, ModuleCommand, markdown_commands

pytestmark = pytest.mark.integration

SCALE = 50
SMALL = [
    "data.synthetic_num_tokens=40000",
    "data.seq_len=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=2",
    "train.steps=6",
    "checkpoint.interval=2",
    "train.val_interval=2",
    "logging.progress_bar=false",
    "logging.heatmap=false",
    "logging.loss_curve=false",
    "logging.wandb.mode=disabled",
]
STEP_KEYS = ("train.steps", "train.stop_at_step", "checkpoint.interval", "train.val_interval")


def scaled(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in STEP_KEYS and value.isdigit():
            arg = f"{key}={max(1, int(value) // SCALE)}"
        out.append(re.sub(r"step_(\d+)", lambda m: f"step_{max(1, int(m.group(1)) // SCALE)}", arg))
    return out


def run_in_order(page: str, cwd) -> list[str]:
    outputs = []
    for cmd in markdown_commands(REPO / page, modules=True):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        if isinstance(cmd, ModuleCommand):
            argv = [sys.executable, "-m", cmd.module, *scaled(cmd.args)]
            proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
            assert proc.returncode == 0, (
                f"{cmd.where}: {' '.join(argv)}\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
            continue
        data = [] if any(a.startswith("data=") for a in cmd.args) else ["data=synthetic"]
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={cmd.world_size}",
            str(REPO / "recipes" / cmd.recipe),
            *data,
            *SMALL,
            *scaled(cmd.args),
        ]
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{cmd.where}: {' '.join(cmd.args)}\n{output[-3000:]}"
        assert "finished step" in output and "the run is complete" not in output, (
            f"{cmd.where}\n{output[-2000:]}"
        )
        outputs.append(output)
    return outputs


@pytest.mark.timeout(900)
def test_readme_commands_run_in_order(tmp_path):
    outputs = run_in_order("README.md", tmp_path)
    assert len(outputs) >= 4
    assert (tmp_path / "outputs/run/checkpoints/step_8/COMPLETE").is_file()  # A (6 steps), extended to 8
    assert (tmp_path / "outputs/single/metrics.jsonl").is_file() and (tmp_path / "outputs/from_run").is_dir()


@pytest.mark.timeout(1200)
def test_checkpoint_docs_commands_run_in_order(tmp_path):
    outputs = run_in_order("docs/checkpoints.md", tmp_path)
    assert len(outputs) >= 7
    assert (tmp_path / "outputs/part/checkpoints/step_6/COMPLETE").is_file()
    assert (tmp_path / "outputs/reshard/checkpoints/step_6/COMPLETE").is_file()

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
import shutil
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
DEFAULT_OUTPUT_DIR = "outputs/run"  # configs/config.yaml
STEP_KEYS = ("train.steps", "train.stop_at_step", "checkpoint.interval", "train.val_interval")


def scaled(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in STEP_KEYS and value.isdigit():
            arg = f"{key}={max(1, int(value) // SCALE)}"
        out.append(re.sub(r"step_(\d+)", lambda m: f"step_{max(1, int(m.group(1)) // SCALE)}", arg))
    return out


def _argv(cmd) -> list[str]:
    if isinstance(cmd, ModuleCommand):
        return [sys.executable, "-m", cmd.module, *scaled(cmd.args)]
    data = [] if any(a.startswith("data=") for a in cmd.args) else ["data=synthetic"]
    return [
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


def _run_dirs(cmd) -> list[str]:
    """The run directories (relative to the page's working directory) a command may read or write: its output_dir
    (the config's default when not given) and every path among its values, cut before `/checkpoints`."""
    values = [a.partition("=")[2] if "=" in a else a for a in scaled(cmd.args)]
    if not isinstance(cmd, ModuleCommand) and not any(a.startswith("output_dir=") for a in cmd.args):
        values.append(DEFAULT_OUTPUT_DIR)
    dirs = {v.split("/checkpoints")[0].rstrip("/") for v in values if v.startswith("outputs/")}
    return sorted(d for d in dirs if not any(_within(d, other) for other in dirs if other != d))


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent + "/")


def _history(d: str, events: list[tuple]) -> tuple:
    """Every earlier command (normalized argv) of the page that touched `d`, a directory inside it or around it."""
    return tuple(argv for dirs, argv in events if any(_within(d, x) or _within(x, d) for x in dirs))


def _key(cmd, events: list[tuple]) -> tuple:
    """What decides a command's result: its normalized command line (overrides of distinct keys in sorted order) and
    the history of every run directory it touches."""
    argv = _argv(cmd)
    if not isinstance(cmd, ModuleCommand) and all(re.fullmatch(r"[\w.]+=.*", a) for a in argv[6:]):
        overrides = dict(a.split("=", 1) for a in argv[6:])  # plain overrides: the last value of a key wins
        argv = [*argv[:6], *(f"{k}={v}" for k, v in sorted(overrides.items()))]
    return (tuple(argv), tuple((d, _history(d, events)) for d in _run_dirs(cmd)))


class DocRunner:
    """Runs pages' commands in order, each page in its own fresh working directory.

    A command whose normalized command line and run directories' histories (every earlier command that touched
    them, in order) equal those of a command already run on an earlier page would repeat the same computation on the
    same files: its run directories are restored from that run's copy instead (docs/checkpoints.md opens with the
    README's command A, its continuation to 400 steps and its init_from run). Everything else runs for real.
    """

    def __init__(self, root):
        self.root, self.done = root, {}  # key -> (copy of the run dirs after it, its output)

    def run_page(self, page: str, cwd) -> list[str]:
        outputs, events = [], []  # (run dirs, normalized argv) of each command so far
        for cmd in markdown_commands(REPO / page, modules=True):
            key, dirs = _key(cmd, events), _run_dirs(cmd)
            if key in self.done:
                saved, output = self.done[key]
                for d in dirs:
                    shutil.rmtree(cwd / d, ignore_errors=True)
                    if (saved / d).exists():
                        shutil.copytree(saved / d, cwd / d)
            else:
                output = self._run(cmd, cwd)
                saved = self.root / f"after{len(self.done)}"
                for d in dirs:
                    if (cwd / d).exists():
                        shutil.copytree(cwd / d, saved / d)
                self.done[key] = saved, output
            events.append((dirs, key[0]))
            if output is not None:
                outputs.append(output)
        return outputs

    def _run(self, cmd, cwd) -> str | None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        argv = _argv(cmd)
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
        output = proc.stdout + proc.stderr
        if isinstance(cmd, ModuleCommand):
            assert proc.returncode == 0, f"{cmd.where}: {' '.join(argv)}\n{output[-3000:]}"
            return None
        assert proc.returncode == 0, f"{cmd.where}: {' '.join(cmd.args)}\n{output[-3000:]}"
        assert "finished step" in output and "the run is complete" not in output, (
            f"{cmd.where}\n{output[-2000:]}"
        )
        return output


@pytest.mark.timeout(1800)
def test_readme_and_checkpoint_docs_commands_run_in_order(tmp_path):
    """README.md, then docs/checkpoints.md (one test: the second page reuses the runs it repeats, see DocRunner)."""
    runner = DocRunner(tmp_path / "runs")
    readme, pages = tmp_path / "readme", tmp_path / "checkpoints"
    readme.mkdir(), pages.mkdir()
    outputs = runner.run_page("README.md", readme)
    assert len(outputs) >= 4
    assert (readme / "outputs/run/checkpoints/step_8/COMPLETE").is_file()  # A (6 steps), extended to 8
    assert (readme / "outputs/single/metrics.jsonl").is_file() and (readme / "outputs/from_run").is_dir()
    outputs = runner.run_page("docs/checkpoints.md", pages)
    assert len(outputs) >= 7
    assert (pages / "outputs/part/checkpoints/step_6/COMPLETE").is_file()
    assert (pages / "outputs/reshard/checkpoints/step_6/COMPLETE").is_file()

"""The recipe's command line outside training (issue 12 §4): `--help` lists only selectable config groups, a Hydra
multirun writes nothing into the working directory's root, and the checkpoint benchmark runs from a fresh clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.integration.recipe import FAST, PRETRAIN, REPO

pytestmark = pytest.mark.integration


def run(argv: list[str], cwd, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_help_lists_exactly_the_selectable_groups(tmp_path):
    proc = run([sys.executable, str(PRETRAIN), "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    section = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = set(re.findall(r"^(\w+):", section, flags=re.M))
    defaults = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())["defaults"]
    groups = {
        next(iter(d)) for d in defaults if isinstance(d, dict) and not next(iter(d)).startswith("override")
    }
    assert listed == groups, (listed, groups)
    assert "cluster" not in listed


@pytest.mark.timeout(300)
def test_multirun_writes_under_outputs_not_the_working_directory(tmp_path):
    argv = [
        sys.executable,
        str(PRETRAIN),
        "-m",
        *FAST,
        "parallel=single",
        "train.steps=1",
        f"output_dir={tmp_path}/a,{tmp_path}/b",
    ]
    proc = run(argv, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "a" / "metrics.jsonl").is_file() and (tmp_path / "b" / "metrics.jsonl").is_file()
    assert not (tmp_path / "multirun").exists()
    assert list((tmp_path / "outputs" / "multirun").glob("*/multirun.yaml"))  # git-ignored in the repo


@pytest.mark.timeout(600)
def test_bench_checkpoint_runs_from_a_fresh_clone(tmp_path):
    """A clone has no bench_results/ (git-ignored): the benchmark creates it instead of failing."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "bench_checkpoint.py", clone / "scripts")
    (clone / "configs").symlink_to(REPO / "configs")
    argv = [
        sys.executable,
        str(clone / "scripts" / "bench_checkpoint.py"),
        "--models",
        "tiny",
        "--worlds",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--json",
        str(tmp_path / "out.json"),
    ]
    proc = run(argv, clone, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (clone / "bench_results").is_dir() and (tmp_path / "out.json").is_file()

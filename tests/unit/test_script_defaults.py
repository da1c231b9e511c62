"""Scripts write their results under git-ignored directories by default (issue 12 §4), never over tracked files."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ignored(path: Path) -> bool:
    rel = path.resolve().relative_to(REPO)
    return subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=REPO).returncode == 0


def test_load_balance_study_does_not_overwrite_the_tracked_figures_by_default():
    args = load_script("study_load_balance").parse_args([])
    assert args.img_dir == args.out / "img"
    assert ignored(args.img_dir / "load_balance_maxvio.png")
    assert load_script("study_load_balance").parse_args(["--img-dir", "docs/img"]).img_dir == Path("docs/img")


def test_hydra_multirun_and_bench_scratch_are_ignored():
    assert ignored(REPO / "outputs" / "multirun" / "x" / "multirun.yaml")  # configs' hydra.sweep.dir
    assert ignored(REPO / "multirun" / "x")
    assert ignored(REPO / "bench_results" / "checkpoint.json")
    for name in ("config.yaml", "finetune.yaml"):
        assert "dir: outputs/multirun/" in (REPO / "configs" / name).read_text()

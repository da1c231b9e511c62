"""The user-facing commands: each `python -m automoe.<command> --help` runs, and every `[project.scripts]` entry
point names a callable that exists."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ["automoe.convert", "automoe.plan", "automoe.prepare_data", "automoe.generate", "automoe.evaluate"]


@pytest.mark.parametrize("module", COMMANDS)
def test_command_help_runs(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_entry_points_name_the_commands():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(target.split(":")[0] for target in scripts.values()) == sorted(COMMANDS)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target

"""Model code must not import torch.distributed: the seams are the dispatcher and the stats reducer."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "automoe"


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("package", ["moe", "models"])
def test_model_code_never_imports_torch_distributed(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found under automoe/{package}"
    offenders = {
        str(f.relative_to(ROOT)): m
        for f in files
        for m in _imported_modules(f)
        if m.startswith("torch.distributed") or m == "torch.distributed"
    }
    assert not offenders, f"torch.distributed imported in model code: {offenders}"


def test_scanner_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from torch.distributed.tensor import DTensor\nimport torch.distributed as dist\n")
    assert {"torch.distributed.tensor", "torch.distributed"} <= set(_imported_modules(bad))

"""Every `torchrun`/`python` command in a recipe's docstring composes onto the JobConfig schema (without launching)."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from automoe.config import JobConfig, register_configs

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.py"))


def hydra_config(recipe: Path) -> tuple[Path, str]:
    """(config dir, config name) of the recipe's `@hydra.main(config_path=..., config_name=...)`."""
    for node in ast.walk(ast.parse(recipe.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "hydra.main":
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            return (recipe.parent / kwargs["config_path"]).resolve(), kwargs["config_name"]
    raise AssertionError(f"{recipe.name}: no @hydra.main")


def documented_commands(recipe: Path) -> list[list[str]]:
    """The arguments after `recipes/<name>.py` of each command line in the docstring (placeholders dropped)."""
    doc = ast.get_docstring(ast.parse(recipe.read_text())) or ""
    lines = doc.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        if line.split()[:1] not in (["torchrun"], ["python"]):
            continue
        words = shlex.split(line, comments=True)
        args = words[[w.endswith(f"recipes/{recipe.name}") for w in words].index(True) + 1 :]
        commands.append([a for a in args if not (a.startswith("[") or a.endswith("]"))])
    return commands


CASES = [(r, args) for r in RECIPES for args in documented_commands(r)]


def test_every_recipe_documents_a_command():
    assert {r for r, _ in CASES} == set(RECIPES)


@pytest.mark.parametrize(
    "recipe,args", CASES, ids=[f"{r.stem}:{' '.join(a) or 'defaults'}" for r, a in CASES]
)
def test_documented_command_composes(recipe, args):
    config_dir, config_name = hydra_config(recipe)
    if "--config-name" in args:
        i = args.index("--config-name")
        config_name, args = args[i + 1], args[:i] + args[i + 2 :]
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name, overrides=args)
    assert isinstance(OmegaConf.to_object(cfg), JobConfig)


def test_documented_commands_fit_their_world_size(tmp_path):
    """The docstrings' launch lines (torchrun --nproc-per-node N) fit the layout their overrides ask for."""
    from automoe.train.build import check_layout
    from tests.doc_commands import compose_job, docstring_commands

    commands = [cmd for recipe in RECIPES for cmd in docstring_commands(recipe)]
    assert len(commands) >= len(RECIPES)
    for cmd in commands:
        check_layout(compose_job(cmd, tmp_path), cmd.world_size)

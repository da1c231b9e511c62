"""The recipe commands written in the docs (README.md, docs/*.md, recipe docstrings), parsed as a launcher would.

Each command is found by its `recipes/pretrain.py` or `recipes/finetune.py` word (the `python -m automoe.<command>`
lines, e.g. generate and evaluate, are `ModuleCommand`s, listed with `markdown_commands(..., modules=True)`). The words before it are the
launcher: torchrun's `--nproc-per-node` x `--nnodes` give the world size (a Slurm script's `--nnodes
"$SLURM_NNODES"` takes its `#SBATCH --nodes=N`), a plain `python` is one process. The words after it are Hydra's:
`--config-name NAME` picks the top-level config, `--cfg job`/`--help` only print, `[...]` is a placeholder, and an
UPPERCASE value (`model=PRESET`) stands for the example in `PLACEHOLDERS`.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("pretrain.py", "finetune.py")
PLACEHOLDERS = {"PRESET": "tiny_dsv3"}
_VALUE_FLAGS = ("--config-name", "--config-path", "--cfg", "-cn", "-cp", "-c", "--package", "-p")


@dataclass
class Command:
    where: str  # file:line of the command's first line
    recipe: str  # pretrain.py | finetune.py
    world_size: int
    args: list[str]  # Hydra overrides
    config_name: str
    prints_only: bool = False  # --cfg / --help: Hydra prints and exits
    launcher: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.where}:{self.recipe}:{' '.join(self.args) or 'defaults'}"[:150]


def _flag(words: list[str], *names: str) -> str | None:
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def parse(line: str, *, where: str, block: str = "") -> Command | None:
    """One shell command line (continuations joined) -> its recipe command, or None if it runs no recipe."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    hits = [i for i, w in enumerate(words) if any(w.endswith(f"recipes/{r}") for r in RECIPES)]
    if not hits:
        return None
    i = hits[0]
    recipe = Path(words[i]).name
    launcher = [w for w in words[:i] if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w) and w != "srun"]
    if not launcher:
        return None  # a recipe named in prose or as an argument, not run
    torchrun = Path(launcher[0]).name == "torchrun" or launcher[1:3] == ["-m", "torch.distributed.run"]
    if torchrun:
        nproc = _flag(launcher, "--nproc-per-node", "--nproc_per_node")
        nnodes = _flag(launcher, "--nnodes") or "1"
        if not nnodes.isdigit():
            match = re.search(r"#SBATCH\s+--nodes[= ](\d+)", block)
            assert match, f"{where}: --nnodes {nnodes} and no #SBATCH --nodes in its block"
            nnodes = match.group(1)
        assert nproc is not None and nproc.isdigit(), f"{where}: no literal --nproc-per-node in {line!r}"
        world = int(nproc) * int(nnodes)
    elif Path(launcher[0]).name.startswith("python"):
        world = 1
    else:
        return None
    rest = [w for w in words[i + 1 :] if not (w.startswith("[") or w.endswith("]"))]
    config_name = "finetune" if recipe == "finetune.py" else "config"
    args, prints_only, k = [], False, 0
    while k < len(rest):
        word = rest[k]
        if word in ("--help", "-h", "--hydra-help", "--info", "-m", "--multirun"):
            prints_only = prints_only or word not in ("-m", "--multirun")
        elif word in _VALUE_FLAGS:
            if word in ("--config-name", "-cn"):
                config_name = rest[k + 1]
            prints_only = prints_only or word in ("--cfg", "-c")
            k += 1
        else:
            key, eq, value = word.partition("=")
            args.append(f"{key}={PLACEHOLDERS.get(value, value)}" if eq else word)
        k += 1
    return Command(where, recipe, world, args, config_name, prints_only, launcher)


@dataclass
class ModuleCommand:
    """A `python -m automoe.<name> ...` line (one process, argparse): run as written by the docs-runs test."""

    where: str
    module: str  # automoe.generate, automoe.evaluate, ...
    args: list[str]

    @property
    def id(self) -> str:
        return f"{self.where}:{self.module}:{' '.join(self.args)}"[:150]


def parse_module(line: str, *, where: str) -> ModuleCommand | None:
    """A `python -m automoe.X ...` command line -> its ModuleCommand (None for anything else)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    if len(words) < 3 or not Path(words[0]).name.startswith("python") or words[1] != "-m":
        return None
    if not words[2].startswith("automoe."):
        return None
    return ModuleCommand(where, words[2], words[3:])


def _shell_lines(text: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, command) of every command in a shell snippet: continuations joined, `&&` chains split."""
    out, buf, start = [], "", first_line
    for offset, raw in enumerate(text.splitlines()):
        if not buf:
            start = first_line + offset
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        full = (buf + raw).strip()
        buf = ""
        for part in full.split("&&"):
            part = part.strip()
            if part and not part.startswith(("#", "...")):
                out.append((start, part))
    return out


def markdown_commands(path: Path, *, modules: bool = False) -> list[Command | ModuleCommand]:
    """Recipe commands in the fenced code blocks of a markdown file (python/yaml blocks skipped), in order; with
    `modules`, also the `python -m automoe.<command>` lines among them."""
    lines = path.read_text().splitlines()
    commands, k = [], 0
    while k < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[k])
        if not fence:
            k += 1
            continue
        lang, end = fence.group(1), k + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        block = "\n".join(line.strip() for line in lines[k + 1 : end])
        if lang not in ("python", "yaml", "json", "text"):
            for number, line in _shell_lines(block, k + 2):
                where = f"{path.relative_to(REPO)}:{number}"
                cmd = parse(line, where=where, block=block)
                if cmd is None and modules:
                    cmd = parse_module(line, where=where)
                if cmd is not None:
                    commands.append(cmd)
        k = end + 1
    return commands


def docstring_commands(recipe: Path) -> list[Command]:
    """Recipe commands in a recipe's module docstring."""
    doc = ast.get_docstring(ast.parse(recipe.read_text())) or ""
    out = []
    for number, line in _shell_lines(doc, 1):
        cmd = parse(line, where=f"{recipe.relative_to(REPO)}:doc{number}")
        if cmd is not None:
            out.append(cmd)
    return out


def documented_markdown() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def compose_job(cmd: Command, tmp_dir: Path):
    """The command's typed JobConfig, composed exactly as its recipe does (without reading an HF directory).

    An absolute `output_dir` (`/shared/runs/...`) is moved under `tmp_dir`: the schema checks it is writable.
    """
    from hydra import compose, initialize_config_dir

    from automoe.config import register_configs
    from automoe.config.job import to_job_config

    args = [
        f"output_dir={tmp_dir}/{a.split('=', 1)[1].lstrip('/')}" if a.startswith("output_dir=/") else a
        for a in cmd.args
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return to_job_config(compose(cmd.config_name, overrides=args))

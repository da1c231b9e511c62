"""Every shape suffix in the package uses only letters of the one legend in docs/architecture.md."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A shape-suffixed name: lower-case stem, then `_` and a suffix that starts with a capital (x_TD, mask_B1SL, cos_BSd).
SUFFIXED = re.compile(r"^_?[a-z][a-z0-9_]*?_([A-Z][A-Za-z0-9]*)$")


def legend() -> dict[str, str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Shape legend", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([A-Z])` \| (.+?) \|$", section, flags=re.M))


def suffixed_names(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.arg):
            name = node.arg
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
        else:
            continue
        match = SUFFIXED.match(name)
        if match:
            yield node.lineno, name, match.group(1)


def test_the_legend_gives_each_letter_one_meaning():
    letters = legend()
    assert len(letters) >= 20, "the legend table in docs/architecture.md was not found"
    assert len(set(letters.values())) == len(letters)


def test_every_shape_suffix_uses_legend_letters():
    letters = set(legend()) | {"1"}
    bad = []
    for path in sorted((ROOT / "automoe").rglob("*.py")):
        for lineno, name, suffix in suffixed_names(path):
            unknown = sorted(set(suffix) - letters)
            if unknown:
                bad.append(
                    f"{path.relative_to(ROOT)}:{lineno}: {name} ({', '.join(unknown)} not in the legend)"
                )
    assert not bad, "shape suffixes outside docs/architecture.md's legend:\n" + "\n".join(sorted(set(bad)))


def test_files_do_not_carry_their_own_legend():
    own = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "automoe").rglob("*.py"))
        if re.search(r"^Letters:|\bLetters: ", p.read_text(), flags=re.M)
    ]
    assert not own, f"per-file legends (use docs/architecture.md's): {own}"

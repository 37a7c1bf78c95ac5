"""House rules that code review alone would miss: data flows one way between stages, nothing imports
the CLI, files stay readable, and every module says what it is for."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "loraforge"
# stage -> stages it must never import (config -> data -> model -> train -> eval/export/serve)
FORBIDDEN = {
    "config": {"data", "model", "train", "eval", "export", "serve", "plan", "quickstart", "tune"},
    "data": {"model", "train", "eval", "export", "serve", "quickstart", "tune"},
    "model": {"train", "eval", "export", "serve", "quickstart", "tune"},
    "train": {"eval", "export", "serve", "quickstart", "tune"},
    "plan": {"data", "model", "train", "eval", "export", "serve", "quickstart", "tune"},
    "eval": {"tune"},  # tune sits after eval: it searches with eval's metric
}


def _modules():
    return sorted(p for p in SRC.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n.split(".")[1] for n in names if n.startswith("loraforge.") and n.count(".") >= 1}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_stage_imports_flow_one_way(path):
    rel = path.relative_to(SRC)
    stage = rel.parts[0].removesuffix(".py")
    used = _imports(path)
    assert "cli" not in used or rel.name == "__main__.py" or stage == "cli", f"{rel} imports the CLI"
    bad = used & FORBIDDEN.get(stage, set())
    assert not bad, f"{rel} (stage {stage}) imports later stage(s) {sorted(bad)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_every_file_has_a_docstring_and_stays_small(path):
    text = path.read_text()
    assert ast.get_docstring(ast.parse(text)), f"{path.name} has no docstring"
    assert len(text.splitlines()) <= 500, f"{path.name} is over 500 lines"

"""House rules that code review alone would miss: data flows one way between stages, nothing imports
the CLI, files stay readable, and every module says what it is for."""

import ast
import gc
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "loraforge"
BASE = {"errors", "files"}  # the lowest layer: errors and the atomic file writes, imported by any stage
# stage -> the only stages it may import (besides BASE), so any new edge fails until it is added here.
# Data flows one way: config -> data -> model -> train -> eval/export/serve -> tune; plan sits beside config.
ALLOWED = {
    "errors": set(),
    "files": set(),              # imports nothing of loraforge
    "__init__": set(),
    "__main__": {"cli"},
    "datasets": set(),           # bundled data files
    "config": set(),
    "plan": {"config"},
    "data": set(),
    "model": {"config", "data"},
    "train": {"config", "data", "model", "plan"},
    "export": {"config", "data", "model", "train"},  # data: imatrix text, end-of-turn tokens; train: RunFiles
    "eval": {"config", "data", "model", "train", "export"},  # export: merged-model variants (eval.variants)
    "serve": {"data", "model", "eval"},  # eval: structured decoding, end-of-turn stop tokens
    "synth": {"config", "data", "eval"},  # after eval: reuses data's checks, eval's judge
    "tune": {"config", "model", "plan", "train", "eval"},  # after eval: it searches with eval's metric
    "quickstart": {"config", "data", "model", "train", "eval"},
    "cli": {"config", "data", "model", "plan", "train", "eval", "export", "serve", "synth", "tune", "quickstart"},
}


def _allowed(stage: str) -> set[str]:
    return ALLOWED[stage] | (set() if stage in BASE else BASE)


def _modules():
    return sorted(p for p in SRC.rglob("*.py"))


def _parse(text: str) -> ast.Module:
    """ast.parse with the garbage collector held off: a collection inside it that formats a traceback (an
    asyncio task left pending by an earlier test, say) trips CPython 3.11's "AST constructor recursion
    depth mismatch"."""
    gc.disable()
    try:
        return ast.parse(text)
    finally:
        gc.enable()


def _imports(path: Path) -> set[str]:
    tree = _parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "loraforge":  # from loraforge import files
                names |= {f"loraforge.{a.name}" for a in node.names}
    return {n.split(".")[1] for n in names if n.startswith("loraforge.") and n.count(".") >= 1}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_stage_imports_flow_one_way(path):
    rel = path.relative_to(SRC)
    stage = rel.parts[0].removesuffix(".py")
    assert stage in ALLOWED, f"{rel}: stage {stage} has no row in ALLOWED (tests/test_architecture.py)"
    used = _imports(path) - {stage}
    assert "cli" not in used or rel.name == "__main__.py" or stage == "cli", f"{rel} imports the CLI"
    bad = used - _allowed(stage)
    assert not bad, f"{rel} (stage {stage}) imports stage(s) {sorted(bad)} its row in ALLOWED does not allow"


def test_allowed_imports_have_no_cycle():
    """The table itself flows one way: no stage may reach itself through the stages it may import."""
    def reach(stage, seen):
        for s in _allowed(stage):
            if s == seen[0]:
                raise AssertionError(f"import cycle: {' -> '.join(seen + [s])}")
            if s not in seen:
                reach(s, seen + [s])
    for stage in ALLOWED:
        reach(stage, [stage])


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_every_file_has_a_docstring_and_stays_small(path):
    text = path.read_text()
    assert ast.get_docstring(_parse(text)), f"{path.name} has no docstring"
    assert len(text.splitlines()) <= 500, f"{path.name} is over 500 lines"

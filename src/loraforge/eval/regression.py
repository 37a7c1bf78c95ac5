"""General-prompt regression set: everyday tasks a fine-tune should not forget how to do.

    from loraforge.eval.regression import load_prompts, score_regression
    prompts = load_prompts()                                  # loraforge/datasets/general_prompts.jsonl
    answers = {p.id: answer_of(p.prompt) for p in prompts}
    result = score_regression(answers)                        # result.rate, result.by_category
    stats.paired_test(tuned.per_example, base.per_example)    # did the fine-tune lose general skills?

Each line of the set is {"id", "prompt", "check"}; the id's prefix before "-" is its category.
Checks are objective so that a small instruct model can pass or fail them:
  contains   {"any": [...]} some / {"all": [...]} every / {"none": [...]} no case-insensitive substring
  regex      {"pattern": "..."}: re.search (flags such as (?i) go inside the pattern)
  exact      {"value": "..."}: equal after SQuAD normalisation
  json_keys  {"keys": [...], "values": {...}}: a JSON object with these keys (and normalised values)
  number     {"value": x, "tol": 1e-6}: the last number in the answer equals x within tol
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError
from loraforge.eval.metrics import normalize_answer, parse_json

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class RegressionPrompt:
    id: str
    prompt: str
    check: dict[str, Any]

    @property
    def category(self) -> str:
        return self.id.split("-", 1)[0]


@dataclass(frozen=True)
class CheckResult:
    id: str
    passed: bool
    reason: str  # why it failed; "" when passed


@dataclass(frozen=True)
class RegressionResult:
    checks: list[CheckResult]

    @property
    def rate(self) -> float:
        return sum(c.passed for c in self.checks) / len(self.checks) if self.checks else 0.0

    @property
    def per_example(self) -> list[float]:
        """1.0/0.0 per prompt in set order, for `stats.bootstrap_ci` and `stats.paired_test`."""
        return [float(c.passed) for c in self.checks]

    @property
    def by_category(self) -> dict[str, float]:
        groups: dict[str, list[bool]] = {}
        for c in self.checks:
            groups.setdefault(c.id.split("-", 1)[0], []).append(c.passed)
        return {name: sum(passed) / len(passed) for name, passed in groups.items()}


# --- checks: each returns None when the answer passes, else the reason it fails -------------------


def _contains(answer: str, check: Mapping[str, Any]) -> str | None:
    text = answer.lower()
    if (any_of := check.get("any")) and not any(s.lower() in text for s in any_of):
        return f"contains none of {any_of}"
    if missing := [s for s in check.get("all", []) if s.lower() not in text]:
        return f"missing {missing}"
    if present := [s for s in check.get("none", []) if s.lower() in text]:
        return f"contains forbidden {present}"
    return None


def _regex(answer: str, check: Mapping[str, Any]) -> str | None:
    return None if re.search(check["pattern"], answer) else f"does not match /{check['pattern']}/"


def _exact(answer: str, check: Mapping[str, Any]) -> str | None:
    return None if normalize_answer(answer) == normalize_answer(str(check["value"])) else "not the exact answer"


def _json_keys(answer: str, check: Mapping[str, Any]) -> str | None:
    value, reason = parse_json(answer)
    if reason is not None:
        return reason
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    if missing := [k for k in check["keys"] if k not in value]:
        return f"missing keys {missing}"
    wrong = [
        k
        for k, want in check.get("values", {}).items()
        if normalize_answer(str(value.get(k))) != normalize_answer(str(want))
    ]
    return f"wrong values for {wrong}" if wrong else None


def _number(answer: str, check: Mapping[str, Any]) -> str | None:
    found = _NUMBER.findall(answer)
    if not found:
        return "no number in the answer"
    got = float(found[-1].replace(",", ""))
    return None if abs(got - float(check["value"])) <= float(check.get("tol", 1e-6)) else f"last number is {got:g}"


_CHECKS: dict[str, tuple[Callable[[str, Mapping[str, Any]], str | None], tuple[str, ...]]] = {
    "contains": (_contains, ()),
    "regex": (_regex, ("pattern",)),
    "exact": (_exact, ("value",)),
    "json_keys": (_json_keys, ("keys",)),
    "number": (_number, ("value",)),
}


def run_check(answer: str, check: Mapping[str, Any]) -> str | None:
    """None if `answer` passes `check`, else the reason it fails."""
    return _CHECKS[check["type"]][0](answer, check)


def _validate(where: str, record: Any) -> RegressionPrompt:
    if not isinstance(record, dict) or not {"id", "prompt", "check"} <= record.keys():
        raise LoraforgeError("a prompt needs the keys id, prompt and check", where=where)
    check = record["check"]
    kind = check.get("type") if isinstance(check, dict) else None
    if kind not in _CHECKS:
        raise LoraforgeError(f"unknown check type {kind!r}", where=where, hint=f"use one of {sorted(_CHECKS)}")
    missing = [k for k in _CHECKS[kind][1] if k not in check]
    if kind == "contains" and not {"any", "all", "none"} & check.keys():
        missing = ["any/all/none"]
    if missing:
        raise LoraforgeError(f"{kind} check lacks {missing}", where=where)
    if kind == "regex":
        try:
            re.compile(check["pattern"])
        except re.error as e:
            raise LoraforgeError(f"invalid regex: {e}", where=where) from None
    return RegressionPrompt(str(record["id"]), str(record["prompt"]), check)


def _parse_lines(source: str, lines: Iterable[str]) -> list[RegressionPrompt]:
    prompts: list[RegressionPrompt] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoraforgeError(f"not JSON: {e.msg}", where=f"{source}:{number}") from None
        prompts.append(_validate(f"{source}:{number}", record))
    ids = [p.id for p in prompts]
    if duplicates := sorted({i for i in ids if ids.count(i) > 1}):
        raise LoraforgeError(f"duplicate prompt ids {duplicates}", where=source)
    return prompts


def load_prompts(path: str | Path | None = None) -> list[RegressionPrompt]:
    """The regression prompts: the built-in set, or a JSONL file in the same format."""
    if path is None:
        resource = files("loraforge").joinpath("datasets", "general_prompts.jsonl")
        return _parse_lines("general_prompts.jsonl", resource.read_text(encoding="utf-8").splitlines())
    file = Path(path)
    if not file.is_file():
        raise LoraforgeError(f"regression set not found: {file}", hint="pass an existing JSONL file")
    return _parse_lines(str(file), file.read_text(encoding="utf-8").splitlines())


def score_regression(
    answers: Mapping[str, str], prompts: Sequence[RegressionPrompt] | None = None
) -> RegressionResult:
    """Pass/fail per prompt (in set order); a prompt without an answer fails with "no answer"."""
    prompts = load_prompts() if prompts is None else prompts
    known = {p.id for p in prompts}
    if unknown := sorted(set(answers) - known):
        raise LoraforgeError(
            f"answers for ids not in the regression set: {unknown[:5]}",
            hint="answer the prompts of the same set you score against",
        )
    checks = []
    for p in prompts:
        reason = "no answer" if p.id not in answers else run_check(answers[p.id], p.check)
        checks.append(CheckResult(p.id, reason is None, reason or ""))
    return RegressionResult(checks)

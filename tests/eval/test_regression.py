"""The shipped general-prompt set loads, every check passes a good answer and fails a non-answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import LoraforgeError
from loraforge.eval.regression import load_prompts, run_check, score_regression

# A correct, plainly worded answer for every prompt in the shipped set.
GOOD = {
    "arith-01": "56", "arith-02": "24", "arith-03": "42", "arith-04": "63", "arith-05": "30",
    "arith-06": "81", "arith-07": "7", "arith-08": "5.75", "arith-09": "1,024", "arith-10": "6 + 4 * 2 = 14",
    "units-01": "200", "units-02": "180 minutes", "units-03": "1500", "units-04": "3,600",
    "units-05": "100°C = 212°F", "units-06": "2000", "units-07": "12", "units-08": "48",
    "capital-01": "Paris", "capital-02": "Tokyo.", "capital-03": "Rome", "capital-04": "Ottawa",
    "capital-05": "Canberra", "capital-06": "Cairo", "capital-07": "Berlin", "capital-08": "Madrid",
    "spell-01": "tac", "spell-02": "5", "spell-03": "HELLO", "spell-04": "B",
    "spell-05": "receive", "spell-06": "Mice",
    "reason-01": "Ann is the shortest.", "reason-02": "6", "reason-03": "Tuesday", "reason-04": "10",
    "reason-05": "They weigh the same.", "reason-06": "It arrives at 5 PM.", "reason-07": "Yes.",
    "reason-08": "No, 21 is odd.", "reason-09": "0.5", "reason-10": "2, 4, 7, 9", "reason-11": "Yes",
    "reason-12": "8",
    "format-01": '{"answer": 5}', "format-02": '```json\n{"name": "Alice", "age": 30}\n```',
    "format-03": '{"colors": ["red", "green", "blue"]}', "format-04": '{"capital": "Rome"}',
    "format-05": "OK", "format-06": "42", "format-07": "yes", "format-08": "2024-03-05",
    "format-09": "BANANA", "format-10": '"hello"', "format-11": "- red\n- blue", "format-12": "[1, 2, 3]",
    "format-13": "75%", "format-14": "Green.",
    "list-01": "Red, yellow, blue", "list-02": "Monday, Tuesday, Wednesday", "list-03": "solid, liquid and gas",
    "list-04": "A, B, C, D, E", "list-05": "1 2 3 4 5", "list-06": "Apple\nBanana\nCherry",
    "translate-01": "Chat", "translate-02": "Gracias", "translate-03": "Wasser", "translate-04": "Hola",
    "translate-05": "Bonjour", "translate-06": "Dog",
    "fact-01": "7", "fact-02": "Earth", "fact-03": "H2O", "fact-04": "0", "fact-05": "William Shakespeare",
    "fact-06": "Jupiter", "fact-07": "7", "fact-08": "Carbon dioxide (CO2)",
}


def test_shipped_set_loads_from_package_data() -> None:
    prompts = load_prompts()
    assert 60 <= len(prompts) <= 80
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.check["type"] for p in prompts} == {"contains", "regex", "exact", "json_keys", "number"}
    assert {p.id for p in prompts} == set(GOOD)


def test_every_check_passes_a_good_answer() -> None:
    result = score_regression(GOOD)
    failed = {c.id: c.reason for c in result.checks if not c.passed}
    assert failed == {}
    assert result.rate == 1.0 and set(result.by_category.values()) == {1.0}


def test_no_check_passes_a_non_answer_or_the_echoed_prompt() -> None:
    result = score_regression({pid: "I don't know." for pid in GOOD})
    assert [c.id for c in result.checks if c.passed] == []
    assert result.per_example == [0.0] * len(GOOD)
    echoed = score_regression({p.id: p.prompt for p in load_prompts()})
    assert [c.id for c in echoed.checks if c.passed] == []


def test_wrong_answers_fail_with_reasons() -> None:
    answers = {
        "arith-01": "7 times 8 is 54",
        "capital-05": "Sydney, not Canberra",
        "format-01": "The answer is 5",
        "format-02": '{"name": "Alice", "age": 31}',
        "reason-01": "Sam is taller than Ann, so Ann",
        "reason-09": "0.45 is smaller than 0.5",
    }
    result = score_regression(answers)
    reasons = {c.id: c.reason for c in result.checks if c.id in answers}
    assert reasons == {
        "arith-01": "last number is 54",
        "capital-05": "contains forbidden ['sydney']",
        "format-01": "not JSON: Expecting value (line 1, column 1)",
        "format-02": "wrong values for ['age']",
        "reason-01": "does not match /(?is)^(?!.*\\b(tom|sam)\\b).*\\bann\\b/",
        "reason-09": "contains forbidden ['0.45']",
    }
    missing = next(c for c in result.checks if c.id == "fact-01")
    assert (missing.passed, missing.reason) == (False, "no answer")
    assert 0.0 <= result.by_category["arith"] < 1.0


def test_check_types() -> None:
    assert run_check("-1,234.5 units", {"type": "number", "value": -1234.5}) is None
    assert run_check("about 3.1", {"type": "number", "value": 3.14159, "tol": 0.05}) is None
    assert run_check("An Apple!", {"type": "exact", "value": "apple"}) is None
    assert run_check("red and blue", {"type": "contains", "all": ["Red", "BLUE"]}) is None
    assert run_check("[1]", {"type": "json_keys", "keys": ["x"]}) == "expected a JSON object, got list"


def test_unknown_ids_and_bad_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(LoraforgeError, match="not in the regression set"):
        score_regression({"nope-01": "x"})
    bad = tmp_path / "set.jsonl"
    bad.write_text('{"id": "a-1", "prompt": "p", "check": {"type": "fuzzy"}}\n')
    with pytest.raises(LoraforgeError, match="unknown check type 'fuzzy'"):
        load_prompts(bad)
    bad.write_text('{"id": "a-1", "prompt": "p", "check": {"type": "contains"}}\n')
    with pytest.raises(LoraforgeError, match="lacks"):
        load_prompts(bad)
    line = '{"id": "a-1", "prompt": "p", "check": {"type": "regex", "pattern": "x"}}\n'
    bad.write_text(line * 2)
    with pytest.raises(LoraforgeError, match="duplicate prompt ids"):
        load_prompts(bad)
    with pytest.raises(LoraforgeError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")


def test_custom_set_scores_in_file_order(tmp_path: Path) -> None:
    custom = tmp_path / "mine.jsonl"
    custom.write_text(
        '{"id": "x-1", "prompt": "Say hi", "check": {"type": "regex", "pattern": "(?i)hi"}}\n\n'
        '{"id": "y-1", "prompt": "Say 3", "check": {"type": "number", "value": 3}}\n'
    )
    prompts = load_prompts(custom)
    result = score_regression({"x-1": "Hi!", "y-1": "two"}, prompts)
    assert [c.passed for c in result.checks] == [True, False]
    assert result.by_category == {"x": 1.0, "y": 0.0}

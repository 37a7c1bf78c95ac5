"""Metrics against hand-computed values; bad answers are per-example failures, bad requests errors."""

from __future__ import annotations

import math
import sys

import pytest

from loraforge.errors import LoraforgeError
from loraforge.eval.metrics import available_metrics, normalize_answer, parse_json, perplexity, score


def test_registry_lists_every_metric() -> None:
    assert available_metrics() == sorted(
        ["accuracy", "bleu", "exact_match", "field_f1", "json_schema", "json_valid", "macro_f1",
         "normalized_match", "regex", "rouge_l", "slot_f1"]
    )


def test_unknown_metric_bad_option_and_length_mismatch_are_user_errors() -> None:
    with pytest.raises(LoraforgeError, match="unknown metric"):
        score("f2", ["a"], ["a"])
    with pytest.raises(LoraforgeError, match="exact_match"):
        score("exact_match", ["a"], ["a"], labels=["a"])
    with pytest.raises(LoraforgeError, match="2 predictions but 1 references"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(LoraforgeError, match="needs references"):
        score("exact_match", ["a"])


def test_exact_and_normalized_match() -> None:
    preds = [" Paris ", "The Eiffel Tower!", "london", "42"]
    refs = ["Paris", "eiffel tower", "London", ["forty-two", "42"]]
    exact = score("exact_match", preds, refs)
    assert exact.per_example == [1.0, 0.0, 0.0, 1.0] and exact.value == 0.5
    assert score("normalized_match", preds, refs).per_example == [1.0, 1.0, 1.0, 1.0]
    assert normalize_answer("  An  apple, a DAY!") == "apple day"


LABELS = ["a", "b", "c"]


def test_accuracy_counts_out_of_label_set_answers_as_wrong() -> None:
    result = score("accuracy", ["a", "b", "maybe c?", "c"], ["a", "c", "c", "c"], labels=LABELS)
    assert result.per_example == [1.0, 0.0, 0.0, 1.0]
    assert result.details["out_of_label_set"] == 1
    assert result.details["failures"] == [{"index": 2, "reason": "out of label set: 'maybe c?'"}]


def test_macro_f1_three_classes_by_hand() -> None:
    # a: tp2 fp0 fn1 -> P 1, R 2/3, F1 0.8;  b: tp1 fp1 fn1 -> F1 0.5;  c: tp1 fp1 fn0 -> F1 2/3
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    result = score("macro_f1", preds, refs, labels=LABELS)
    assert result.value == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # 59/90
    per_class_a = {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert result.details["per_class"]["a"] == pytest.approx(per_class_a)
    assert result.per_example == [1, 1, 0, 1, 0, 1]


def test_macro_f1_out_of_set_answer_is_a_miss_without_a_false_positive() -> None:
    result = score("macro_f1", ["a", "zzz"], ["a", "b"], labels=LABELS)
    # a: P 1 R 1 F1 1; b: tp0 fp0 fn1 -> F1 0; c never occurs -> not averaged
    assert result.value == pytest.approx(0.5)
    assert set(result.details["per_class"]) == {"a", "b"}


def test_classification_needs_a_label_set_that_covers_the_references() -> None:
    with pytest.raises(LoraforgeError, match="needs the label set"):
        score("accuracy", ["a"], ["a"])
    with pytest.raises(LoraforgeError, match="not in the label set"):
        score("macro_f1", ["a"], ["d"], labels=LABELS)


def test_json_valid_reports_reasons_and_accepts_fences() -> None:
    result = score("json_valid", ['{"x": 1}', "```json\n[1, 2]\n```", "Sure! {x: 1}", ""])
    assert result.per_example == [1.0, 1.0, 0.0, 0.0]
    reasons = {f["index"]: f["reason"] for f in result.details["failures"]}
    assert reasons[2].startswith("not JSON") and reasons[3] == "empty answer"
    assert parse_json("null") == (None, None)


SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


def test_json_schema_compliance() -> None:
    result = score("json_schema", ['{"x": 3}', '{"x": "3"}', '{"y": 1}', "nope"], schema=SCHEMA)
    assert result.per_example == [1.0, 0.0, 0.0, 0.0]
    reasons = [f["reason"] for f in result.details["failures"]]
    assert "is not of type 'integer'" in reasons[0] and "$.x" in reasons[0]
    assert "'x' is a required property" in reasons[1]
    assert reasons[2].startswith("not JSON")


def test_invalid_or_missing_schema_is_one_error() -> None:
    with pytest.raises(LoraforgeError, match="invalid JSON schema"):
        score("json_schema", ['{"x": 1}'], schema={"type": "integerr"})
    with pytest.raises(LoraforgeError, match="needs schema"):
        score("json_schema", ['{"x": 1}'])


def test_field_f1_per_example_and_per_field() -> None:
    refs = [{"name": "Ann", "age": 30, "city": {"name": "Rome"}}, '{"name": "Bo", "age": 5}', {"name": "Cy"}]
    preds = [
        '{"name": "Ann", "age": 31, "city": {"name": "Rome"}, "extra": true}',  # 2 of 4 pred, 2 of 3 ref
        '{"name": "bo", "age": 5}',  # exact: name wrong
        "[1, 2]",  # not an object
    ]
    result = score("field_f1", preds, refs)
    assert result.per_example == pytest.approx([2 * 2 / 7, 2 * 1 / 4, 0.0])
    assert result.details["failures"] == [{"index": 2, "reason": "expected a JSON object, got list"}]
    name = result.details["per_field"]["name"]  # tp 1 (Ann), fp 1 (bo), fn 2 (Bo, Cy)
    assert name == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3})
    assert result.details["per_field"]["city.name"]["f1"] == 1.0
    micro = result.details["micro"]  # tp 3; fp 3 (age 31, extra, bo); fn 3 (age 30, Bo, Cy)
    assert micro["precision"] == pytest.approx(3 / 6) and micro["recall"] == pytest.approx(3 / 6)
    assert score("field_f1", preds[1:2], refs[1:2], normalize=True).per_example == [1.0]


def test_field_f1_rejects_a_reference_that_is_not_an_object() -> None:
    with pytest.raises(LoraforgeError, match="reference 0 is not a JSON object"):
        score("field_f1", ["{}"], ["[1]"])


def test_regex_full_match_and_search() -> None:
    preds = ["2024-03-05", " 2024-03-05\n", "on 2024-03-05"]
    assert score("regex", preds, pattern=r"\d{4}-\d{2}-\d{2}").per_example == [1.0, 1.0, 0.0]
    assert score("regex", preds, pattern=r"\d{4}-\d{2}-\d{2}", full=False).value == 1.0
    with pytest.raises(LoraforgeError, match="invalid regex"):
        score("regex", preds, pattern="(")


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4; P 4/6, R 4/5 -> F 8/11
    result = score("rouge_l", ["the cat sat on the mat"], ["the cat on a mat"])
    assert result.value == pytest.approx(8 / 11)
    assert score("rouge_l", ["the cat sat"], [["dog", "the cat sat"]]).value == pytest.approx(1.0)


def test_bleu_matches_sacrebleu_documented_example() -> None:
    refs = [
        ["The dog bit the man.", "The dog had bit the man."],
        ["It was not unexpected.", "No one was surprised."],
        ["The man bit him first.", "The man had bitten the dog."],
    ]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    result = score("bleu", hyps, refs)
    assert round(result.value, 2) == 48.53  # sacrebleu README: BLEU = 48.53 82.4/50.0/45.5/37.5
    assert [round(p, 1) for p in result.details["precisions"]] == [82.4, 50.0, 45.5, 37.5]
    assert result.per_example[0] == pytest.approx(100.0)


def test_missing_optional_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)  # makes the import fail
    with pytest.raises(LoraforgeError, match=r"loraforge\[eval\]"):
        score("bleu", ["a"], ["a"])


def test_perplexity() -> None:
    assert perplexity(math.log(8)) == pytest.approx(8.0)
    # token-weighted: (1*3 + 2*1) / 4 = 1.25
    assert perplexity([1.0, 2.0], token_counts=[3, 1]) == pytest.approx(math.exp(1.25))
    assert perplexity(1e6) == math.inf
    with pytest.raises(LoraforgeError):
        perplexity([1.0, 2.0], token_counts=[1])

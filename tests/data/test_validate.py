"""`data validate`: every record checked, problems grouped by kind with first examples, invalid records
in a rejects file with their reasons, the same judgement as the training reader."""

import pytest
from conftest import make_tokenizer
from families import family_tokenizer
from messy import (
    INVALID,
    KINDS,
    RECORDS,
    VALID,
    digest,
    msg,
    read_jsonl,
    write_jsonl_rows,
    write_messy,
)

from loraforge.data.formats import ReadOptions, read_examples
from loraforge.data.validate import summary_counts, validate_file
from loraforge.errors import LoraforgeError


@pytest.fixture()
def messy(tmp_path):
    return write_messy(tmp_path / "messy.jsonl")


def test_messy_file_counts_and_rejects(messy, tmp_path):
    before = digest(messy)
    r = validate_file(messy, out=tmp_path / "clean.jsonl", rejects=tmp_path / "rejects.jsonl")
    assert (r.records, r.valid, r.invalid, r.with_warnings) == (RECORDS, VALID, INVALID, 1)
    assert dict(summary_counts(r)) == KINDS
    assert r.format == "messages" and r.detected_at == f"{messy}:1"
    assert r.groups["invalid_json"].examples == [f"{messy}:12: not valid JSON: Expecting ',' delimiter (column 48)"]
    assert r.groups["bad_encoding"].examples[0].startswith(f"{messy}:18: bytes that are not UTF-8 at column")
    assert r.groups["mixed_format"].examples[0] == f"{messy}:17: this record is sharegpt but the file is messages " \
                                                   f"(detected at {messy}:1)"
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert len(rejects) == INVALID == r.rejected
    assert rejects[0]["where"] == f"{messy}:12" and rejects[0]["problems"][0]["kind"] == "invalid_json"
    assert rejects[0]["line"] == '{"messages": [{"role": "user", "content": "hi"}'
    clean = read_jsonl(tmp_path / "clean.jsonl")
    assert len(clean) == VALID == r.written and clean[0]["messages"][0]["content"] == "What colour is the apple?"
    assert digest(messy) == before


def test_training_reader_raises_the_first_error_the_validator_reports(messy):
    r = validate_file(messy)
    first = min((g for g in r.groups.values() if g.severity == "error"), key=lambda g: int(g.examples[0].split(":")[1]))
    with pytest.raises(LoraforgeError) as err:
        read_examples(messy)
    assert str(err.value).startswith(first.examples[0])


def test_clean_file_has_no_problems(chat_file):
    r = validate_file(chat_file)
    assert r.clean and r.valid == 48 and r.rejects_path is None


def test_lengths_and_masks_with_a_tokenizer(tmp_path):
    f = write_jsonl_rows(tmp_path / "l.jsonl", [msg(("user", "hi"), ("assistant", "ok")),
                                                msg(("user", "apple " * 80), ("assistant", "ok"))])
    r = validate_file(f, tokenizer=make_tokenizer(), max_seq_length=64)
    assert r.valid == 1 and dict(summary_counts(r)) == {"too_long": 1} and r.masks_checked == 1
    assert "over max_seq_length=64" in r.groups["too_long"].examples[0]


def test_template_rejection_is_a_problem_not_a_crash(tmp_path):
    f = write_jsonl_rows(tmp_path / "s.jsonl", [msg(("system", "s"), ("user", "hi"), ("assistant", "ok"))])
    r = validate_file(f, tokenizer=family_tokenizer("gemma"))
    assert dict(summary_counts(r)) == {"template_error": 1}
    assert "System role not supported" in r.groups["template_error"].examples[0]


def test_output_may_not_overwrite_the_input(messy):
    with pytest.raises(LoraforgeError, match="overwrite an input"):
        validate_file(messy, out=messy)


def test_banking77_columns(tmp_path):
    from importlib import resources

    csv_path = resources.files("loraforge.datasets") / "banking77" / "train.csv"
    r = validate_file(csv_path, out=tmp_path / "b.jsonl")
    assert (r.records, r.valid, r.format) == (10003, 10003, "columns") and r.clean
    first = read_jsonl(tmp_path / "b.jsonl")[0]
    assert first == {"messages": [{"role": "user", "content": "I am still waiting on my card?"},
                                  {"role": "assistant", "content": "card_arrival"}], "label": "card_arrival"}
    r = validate_file(csv_path, ReadOptions("columns", response_column="category",
                                            prompt_template="Classify: {text}"), out=tmp_path / "t.jsonl")
    assert read_jsonl(tmp_path / "t.jsonl")[0]["messages"][0]["content"] == "Classify: I am still waiting on my card?"

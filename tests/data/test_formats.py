"""Reading and normalising records: every supported format, and errors that name file:line."""

import json

import pytest

from loraforge.data.formats import read_examples
from loraforge.errors import LoraforgeError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_jsonl(tmp_path):
    f = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]}])
    (ex,) = read_examples(f, system_prompt="Be kind.")
    assert ex.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]
    assert ex.source == f"{f}:1" and ex.label == "hello"


def test_alpaca_json_array_and_jsonl(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "output": "hi"}]
    a = tmp_path / "a.json"
    a.write_text(json.dumps(rows))
    b = _jsonl(tmp_path / "a.jsonl", rows)
    for f in (a, b):
        ex = read_examples(f)
        assert ex[0].messages == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
        assert ex[1].messages[0] == {"role": "user", "content": "Say hi"}


def test_sharegpt(tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    assert read_examples(f)[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_columns_csv(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("text,category\nWhere is my card?,card_arrival\n")
    (ex,) = read_examples(f, prompt_column="text", response_column="category")
    assert ex.messages[-1] == {"role": "assistant", "content": "card_arrival"} and ex.source == f"{f}:2"


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n{"messages": [}\n',
     r"m.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', r"m.jsonl:1: unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"m.jsonl:1: the last turn must be the assistant's"),
    ('{"foo": 1}\n', r"m.jsonl:1: cannot tell the format"),
    ('\n\n', r"m.jsonl: the data file has no records"),
])
def test_bad_records_point_at_the_line(tmp_path, content, message):
    f = tmp_path / "m.jsonl"
    f.write_text(content)
    with pytest.raises(LoraforgeError, match=message):
        read_examples(f)


def test_missing_file(tmp_path):
    with pytest.raises(LoraforgeError, match="data file not found"):
        read_examples(tmp_path / "none.jsonl")

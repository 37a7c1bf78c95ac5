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


# --- formats, detection and streaming readers -----------------------------------------------------------------

from loraforge.data import readers  # noqa: E402
from loraforge.data.formats import ReadOptions, RecordStream, detect_format  # noqa: E402
from loraforge.data.readers import read_raw  # noqa: E402

QA = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("record, fmt", [
    (QA, "messages"), ({"conversations": []}, "sharegpt"), ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"text": "t", "category": "c"}, "columns"), ({"prompt": "p", "completion": "c"}, "columns"),
    ({"text": "t"}, "text"), ({"foo": 1}, "unknown"), ([1], "unknown"),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_sharegpt_role_names_and_unknown_speaker(tmp_path):
    turns = [{"from": "system", "value": "s"}, {"from": "user", "value": "q"}, {"from": "bot", "value": "a"}]
    odd = [{"from": "narrator", "value": "q"}]
    f = _jsonl(tmp_path / "s.jsonl", [{"conversations": turns}, {"conversations": odd}])
    items = list(RecordStream(f))
    assert [t["role"] for t in items[0].example.messages] == ["system", "user", "assistant"]
    assert items[1].example is None and items[1].problems[0].kind == "unknown_role"


def test_raw_text_for_pretraining(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": ""}])
    stream = RecordStream(f)
    ok, empty = list(stream)
    assert stream.format == "text" and ok.example.messages == [{"role": "assistant", "content": "Once upon a time."}]
    assert [p.kind for p in empty.problems] == ["empty_turn"]


def test_explicit_format_wins_over_detection(tmp_path):
    f = _jsonl(tmp_path / "x.jsonl", [{"text": "hello", "label": "greeting"}])
    assert list(RecordStream(f))[0].example.messages[-1]["content"] == "greeting"  # detected: columns
    (item,) = RecordStream(f, ReadOptions("text"))
    assert item.example.messages == [{"role": "assistant", "content": "hello"}]


def test_json_array_streams_in_chunks_with_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK", 16)  # every record straddles several chunks
    rows = [{"instruction": f"say {'x' * 40} {i}", "output": str(i)} for i in range(5)]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(rows, indent=1))
    raws = list(read_raw(f))
    assert [r.value for r in raws] == rows
    assert [r.line for r in raws] == [2, 6, 10, 14, 18]


def test_json_array_that_breaks_is_reported_with_line_and_column(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n {"text": "a"},\n {"text": "b" "c"}\n]')
    good, bad = read_raw(f)
    assert good.value == {"text": "a"}
    assert bad.where == f"{f}:3"
    assert bad.problem.message.startswith("not valid JSON: Expecting ',' delimiter (column 15)")


def test_json_single_object_and_jsonl_named_json(tmp_path):
    a, b = tmp_path / "one.json", tmp_path / "lines.json"
    a.write_text(json.dumps({"data": [QA, QA]}))
    b.write_text(json.dumps(QA) + "\n" + json.dumps(QA) + "\n")
    assert [r.value for r in read_raw(a)] == [QA, QA]
    assert [r.line for r in read_raw(b)] == [1, 2]


def test_tsv_csv_bad_bytes_and_ragged_rows(tmp_path):
    t = tmp_path / "d.tsv"
    t.write_text("prompt\tresponse\nhi\tthere\n")
    assert read_examples(t, prompt_column="prompt", response_column="response")[0].label == "there"
    c = tmp_path / "d.csv"
    c.write_bytes(b'text,category\n"multi\nline",a\ncaf\xe9,b\nx,y,z\nok,c\n')
    raws = list(read_raw(c))
    assert [(r.line, r.problem.kind if r.problem else None) for r in raws] == \
        [(2, None), (4, "bad_encoding"), (5, "bad_row"), (6, None)]
    assert raws[0].value == {"text": "multi\nline", "category": "a"}


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([QA, {"messages": [{"role": "user", "content": "x"}]}]), f)
    items = list(RecordStream(f))
    assert items[0].example.messages == QA["messages"] and items[1].problems[0].kind == "no_assistant"
    assert items[1].where == f"{f}:2"
    f.write_text("not parquet")
    with pytest.raises(LoraforgeError, match="not a readable Parquet file"):
        list(read_raw(f))

"""Bad input, generated: arbitrary JSON values, truncated files, mixed formats, huge fields and bytes that
are not UTF-8. Each ends in a report or a clear LoraforgeError (exit 2 from the CLI), never a traceback,
and the input file is never modified."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messy import digest

from loraforge.cli import main
from loraforge.data.formats import read_examples
from loraforge.data.validate import validate_file
from loraforge.errors import LoraforgeError

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=8)
roles = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt"]) | values
turn = st.fixed_dictionaries({}, optional={"role": roles, "content": st.text(max_size=20) | values,
                                           "from": roles, "value": st.text(max_size=20) | values})
records = st.one_of(
    values,
    st.builds(lambda t: {"messages": t}, st.lists(turn, max_size=4) | values),
    st.builds(lambda t: {"conversations": t}, st.lists(turn, max_size=4)),
    st.fixed_dictionaries({"instruction": st.text(max_size=10) | values, "output": st.text(max_size=10) | values},
                          optional={"input": values, "system": values}),
    st.fixed_dictionaries({"text": st.text(max_size=20) | values}, optional={"label": values}),
)


def _check(path: Path) -> None:
    """The whole contract on one file: a report or a LoraforgeError, exit 0 or 2, the file unchanged."""
    before = digest(path)
    try:
        read_examples(path)
    except LoraforgeError:
        pass
    for cmd in (["validate", str(path), "--rejects", str(path.with_name("r.jsonl")), "--json"],
                ["dedup", str(path), str(path.with_name("d.jsonl")), "--json"],
                ["split", str(path), "--train", str(path.with_name("t.jsonl")), "--validation",
                 str(path.with_name("v.jsonl")), "--json"]):
        assert main(["data", *cmd]) in (0, 2)
    assert digest(path) == before


@SETTINGS
@given(rows=st.lists(records, min_size=1, max_size=6), cut=st.integers(0, 10_000), bad=st.integers(0, 10_000),
       suffix=st.sampled_from([".jsonl", ".json"]))
def test_arbitrary_records_truncated_and_bad_bytes(rows, cut, bad, suffix):
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode()
    if cut % 3 == 0:
        data = data[: cut % (len(data) + 1)]
    if bad % 4 == 0:
        k = bad % (len(data) + 1)
        data = data[:k] + b"\xff\xc3" + data[k:]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(data)
        _check(path)


@SETTINGS
@given(cells=st.lists(st.lists(st.text(max_size=15), min_size=1, max_size=4), min_size=1, max_size=5),
       header=st.sampled_from(["text,category", "prompt,response", "a,b,c", ""]),
       raw=st.binary(max_size=30))
def test_arbitrary_tables(cells, header, raw):
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(cells)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.csv"
        path.write_bytes(header.encode() + b"\n" + buf.getvalue().encode("utf-8", "surrogatepass") + raw)
        _check(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_huge_fields(tmp_path, suffix):
    big = "apple " * 400_000  # 2.4 MB in one field, across many read chunks
    rec = {"messages": [{"role": "user", "content": big}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / f"big{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps([rec, rec]))
    else:
        path.write_text(f'text,category\n"{big}",fruit\n')
    r = validate_file(path)
    assert r.valid == (1 if suffix == ".csv" else 2) and r.invalid == 0
    _check(path)


def test_mixed_formats_in_one_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"instruction": "q", "output": "a"}, {"text": "plain"}, {"prompt": "q", "completion": "a"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = validate_file(path)
    assert (r.valid, r.invalid) == (1, 4) and r.groups["mixed_format"].count == 4
    assert r.formats == {"messages": 1, "sharegpt": 1, "alpaca": 1, "text": 1, "columns": 1}
    _check(path)

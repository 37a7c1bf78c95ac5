"""SNIPS 2017 as chats (loraforge.data.snips): the shipped train/test files (counts, every answer parses and
satisfies the shipped schema, keys in schema order, every slot text is in its query), the published file that
is not valid UTF-8 (a CESU-8 emoji) repaired and reported, never a traceback, and the micro slot F1 metric."""

import json
from pathlib import Path

import pytest

from loraforge.data.snips import INTENTS, convert, decode, main
from loraforge.errors import LoraforgeError
from loraforge.eval.metrics import score
from loraforge.eval.stats import bootstrap_micro_f1_ci

SHIPPED = Path(__file__).resolve().parents[2] / "src/loraforge/datasets/snips2017"
ORIGINAL = Path("/work/shared/data/snips2017")   # present only beside the project's own checkout


def _cesu8(text: str) -> bytes:
    """UTF-8 of `text` with astral characters written as two encoded surrogates (as the published file has)."""
    def pair(c: str) -> str:
        cp = ord(c) - 0x10000
        return chr(0xD800 + (cp >> 10)) + chr(0xDC00 + (cp & 0x3FF)) if cp >= 0 else c

    return "".join(map(pair, text)).encode("utf-8", "surrogatepass")


def _rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (SHIPPED / name).read_text(encoding="utf-8").splitlines()]


def test_shipped_files_counts_answers_and_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SHIPPED / "schema.json").read_text())
    order = list(schema["properties"])
    assert order == sorted(order) and len(order) == 39
    train, test = _rows("train.jsonl"), _rows("test.jsonl")
    assert len(train) == 13784 and len(test) == 700
    assert {r["intent"] for r in test} == set(INTENTS) and all(
        sum(r["intent"] == i for r in test) == 100 for i in INTENTS)
    check = jsonschema.Draft202012Validator(schema).validate
    for k, r in enumerate(train + test):
        query, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        slots = json.loads(answer)
        if k % 10 == 0 or k >= len(train):        # every test answer, a tenth of the training answers
            check(slots)
        assert set(slots) <= set(order)
        assert list(slots) == sorted(slots) and answer == json.dumps(slots, ensure_ascii=False)
        for v in slots.values():
            assert all(x in query for x in (v if isinstance(v, list) else [v]))
    assert sum(isinstance(v, list) for r in train for v in json.loads(r["messages"][1]["content"]).values()) >= 61
    assert any("\U0001F355" in r["messages"][0]["content"] for r in train)   # the repaired emoji
    assert "CC0" in (SHIPPED / "LICENSE").read_text() or "Creative Commons" in (SHIPPED / "LICENSE").read_text()
    assert "CESU-8" in (SHIPPED / "SOURCE.md").read_text()
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5_000_000


def test_cesu8_file_is_repaired_and_reported(tmp_path):
    pieces = [{"text": "play "}, {"text": "Pop Punk \U0001F355", "entity": "playlist"}, {"text": " now"}]
    for split, pattern in (("train", "train_{}_full.json"), ("test", "validate_{}.json")):
        for intent in INTENTS:
            text = json.dumps({intent: [{"data": pieces}, {"data": [{"text": "hi"}]}]}, ensure_ascii=False)
            (tmp_path / pattern.format(intent)).write_bytes(_cesu8(text))
    raw = (tmp_path / "train_PlayMusic_full.json").read_bytes()
    assert b"\xed\xa0\xbc\xed\xbd\x95" in raw
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    splits, schema, notes = convert(tmp_path)
    assert len(splits["train"]) == len(splits["test"]) == 14 and list(schema["properties"]) == ["playlist"]
    assert json.loads(splits["train"][0]["messages"][1]["content"]) == {"playlist": "Pop Punk \U0001F355"}
    assert splits["train"][1]["messages"][1]["content"] == "{}"
    assert any("offset" in n for n in notes) and any("CESU-8" in n for n in notes)
    text, notes = decode(b'{"a": "\xff"}', "x.json")     # any other bad byte: replaced, and said so
    assert text == '{"a": "\ufffd"}' and "U+FFFD" in notes[-1]


def test_bad_folder_and_bad_file_are_one_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "SNIPS folder not found" in capsys.readouterr().err
    (tmp_path / "train_AddToPlaylist_full.json").write_text("[1, 2")
    with pytest.raises(LoraforgeError, match="not JSON"):
        convert(tmp_path)


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason="the original SNIPS files are not beside this checkout")
def test_conversion_of_the_original_files_is_what_is_shipped(tmp_path, capsys):
    assert main([str(ORIGINAL), str(tmp_path)]) == 0
    assert "train_PlayMusic_full.json: not valid UTF-8" in capsys.readouterr().err
    for name in ("train.jsonl", "test.jsonl", "schema.json"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes()


def test_slot_f1_is_micro_over_slot_value_pairs():
    preds = ['{"a": "x", "b": "y"}', "not json", '{"c": ["p", "q"]}', '{"a": " x "}']
    refs = [{"a": "x", "b": "z"}, '{"a": "q"}', {"c": ["q", "p"]}, {"a": "x"}]
    r = score("slot_f1", preds, refs)
    # tp = 1 + 0 + 2 + 1, fp = 1, fn = 1 + 1: P = 4/5, R = 4/6
    assert r.value == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert r.details["counts"] == [[1, 1, 1], [0, 0, 1], [2, 0, 0], [1, 0, 0]]
    assert r.per_example == [0.5, 0.0, 1.0, 1.0] and "not JSON" in r.details["failures"][0]["reason"]
    assert r.details["per_field"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    lo, hi = bootstrap_micro_f1_ci(r.details["counts"] * 25)
    assert lo < r.value < hi and hi - lo < 0.3

"""`loraforge data ...` end to end on BANKING77 and on the messy file: the counts each command reports,
exit code 2 for user errors, and input files left untouched."""

import json
from importlib import resources

import pytest
from messy import (
    EXACT_DUPS,
    INVALID,
    KINDS,
    NEAR_DUPS,
    RECORDS,
    VALID,
    digest,
    read_jsonl,
    write_messy,
)

from loraforge.cli import main

BANKING = str(resources.files("loraforge.datasets") / "banking77" / "train.csv")


@pytest.fixture()
def messy(tmp_path):
    return write_messy(tmp_path / "messy.jsonl")


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *args):
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_help_lists_the_data_commands(capsys):
    code, out, _ = _run(capsys, "data", "--help")
    assert code == 0 and all(c in out for c in ("convert", "validate", "dedup", "split", "inspect", "sample"))


def test_validate_messy_then_strict(messy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = digest(messy)
    r = _json(capsys, "data", "validate", str(messy))
    assert (r["records"], r["valid"], r["invalid"]) == (RECORDS, VALID, INVALID)
    assert {k: v["count"] for k, v in r["problems"].items()} == KINDS
    assert r["rejects_path"] == "messy.rejects.jsonl" and len(read_jsonl(tmp_path / "messy.rejects.jsonl")) == INVALID
    code, out, _ = _run(capsys, "data", "validate", str(messy))
    assert code == 0 and "unknown_role" in out and "messy.jsonl:13:" in out
    code, _, err = _run(capsys, "data", "validate", str(messy), "--strict")
    assert code == 2 and "10 invalid records and 1 with warnings (--strict)" in err and "Traceback" not in err
    assert digest(messy) == before


def test_validate_convert_dedup_split_banking77(tmp_path, capsys):
    r = _json(capsys, "data", "validate", BANKING, "--columns", "text,category", "--template", "Intent of: {text}")
    assert (r["records"], r["valid"], r["format"], r["problems"]) == (10003, 10003, "columns", {})
    r = _json(capsys, "data", "convert", BANKING, str(tmp_path / "b.jsonl"))
    assert r["format"] == "columns" and r["written"] == 10003 and r["rejects_path"] is None
    r = _json(capsys, "data", "dedup", str(tmp_path / "b.jsonl"), str(tmp_path / "d.jsonl"), "--method", "exact")
    assert r["kept"] == 9999 and r["removed"] == {"exact": 4} and r["input"]["format"] == "messages"
    r = _json(capsys, "data", "split", str(tmp_path / "d.jsonl"), "--train", str(tmp_path / "tr.jsonl"),
              "--validation", str(tmp_path / "va.jsonl"), "--near-threshold", "0")
    assert r["stratified"] and r["train"] + r["validation"] == 9999 and r["leaks_exact"] == 0
    assert r["validation"] == sum(v for _, v in r["labels"].values()) and 990 <= r["validation"] <= 1010


def test_dedup_and_split_messy(messy, tmp_path, capsys):
    r = _json(capsys, "data", "dedup", str(messy), str(tmp_path / "d.jsonl"))
    assert r["removed"] == {"exact": EXACT_DUPS, "near": NEAR_DUPS} and r["clusters"] == 2
    assert r["input"]["invalid"] == INVALID and len(read_jsonl(tmp_path / "d.rejects.jsonl")) == INVALID
    code, out, _ = _run(capsys, "data", "dedup", str(messy), str(tmp_path / "d2.jsonl"))
    assert code == 0 and "Largest clusters" in out
    r = _json(capsys, "data", "split", str(messy), "--train", str(tmp_path / "t.jsonl"),
              "--validation", str(tmp_path / "v.jsonl"), "--fraction", "0.2")
    assert r["train"] + r["validation"] == VALID and r["leaks_near"] == 0 and r["grouped"] == 3


def test_inspect_and_sample(tiny_model, messy, tmp_path, capsys):
    r = _json(capsys, "data", "inspect", BANKING, "--model", str(tiny_model), "--max-seq-length", "64")
    assert r["input"]["valid"] == 10003 and r["n_labels"] == 77 and r["turns"] == {"2": 10003}
    assert r["truncated"] > 0 and r["suggested_max_seq_length"] >= 64
    code, out, err = _run(capsys, "data", "inspect", str(messy), "--model", str(tiny_model), "--html",
                          str(tmp_path / "r.html"))
    assert code == 0 and "suggested max_seq_length" in out and "<svg" in (tmp_path / "r.html").read_text()
    code, out, _ = _run(capsys, "data", "sample", BANKING, "-n", "2", "--model", str(tiny_model), "--seed", "7")
    assert code == 0 and out.count("<|im_end|>\u27e7") == 2 and "2 of 10,003 valid records" in out
    code, out, _ = _run(capsys, "data", "sample", str(messy), "-n", "3", "--model", str(tiny_model))
    assert code == 0 and out.count("<|im_end|>\u27e7") == 3 and f"3 of {VALID} valid records" in out
    assert "<|im_start|>assistant\n\u27e6" in out  # the loss starts right after the generation prompt


@pytest.mark.parametrize("args, message", [
    (["data", "validate", "nope.jsonl"], "nope.jsonl: data file not found"),
    (["data", "validate", "{messy}", "--format", "yaml"], "unknown format 'yaml'"),
    (["data", "validate", "{messy}", "--columns", "text"], "--columns must be PROMPT,RESPONSE"),
    (["data", "dedup", "{messy}", "{messy}"], "would overwrite an input file"),
    (["data", "dedup", "{messy}", "out.jsonl", "--method", "fuzzy"], "unknown dedup method"),
    (["data", "split", "{messy}", "--fraction", "2"], "between 0 and 1"),
    (["data", "sample", "{messy}", "-n", "0", "--model", "{model}"], "-n must be at least 1"),
    (["data", "sample", "{messy}", "--train-on", "most", "--model", "{model}"], "train_on must be assistant or all"),
    (["data", "inspect", "{messy}", "--model", "{messy}"], "not a Hugging Face model folder"),
])
def test_user_errors_exit_2(args, message, messy, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *[a.format(messy=messy, model=tiny_model) for a in args])
    assert code == 2 and message in err and "Traceback" not in err

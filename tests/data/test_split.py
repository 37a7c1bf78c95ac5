"""`data split`: seeded, stratified by label when there is one, duplicates and near-duplicates kept on
one side, and checked for leaks independently."""

import json
from collections import Counter
from importlib import resources

import pytest
from messy import INVALID, VALID, digest, msg, read_jsonl, write_messy

from loraforge.data.dedup import exact_key
from loraforge.data.formats import read_examples
from loraforge.data.split import assign, split_file
from loraforge.errors import LoraforgeError

BANKING = resources.files("loraforge.datasets") / "banking77" / "train.csv"


def test_banking77_is_stratified_and_seeded(tmp_path):
    r = split_file(BANKING, tmp_path / "tr.jsonl", tmp_path / "va.jsonl", seed=1)
    assert r.stratified and (r.train, r.validation) == (9000, 1003) and r.train + r.validation == 10003
    assert r.leaks_exact == 0 and r.leaks_near == 0 and r.grouped == 272
    assert len(r.labels) == 77
    for label, (tr, va) in r.labels.items():  # about 10% of every label held out
        assert abs(va - 0.1 * (tr + va)) <= 3, label
    va_labels = Counter(row["label"] for row in read_jsonl(tmp_path / "va.jsonl"))
    assert va_labels == Counter({k: v for k, (_, v) in r.labels.items() if v})
    other = split_file(BANKING, tmp_path / "tr3.jsonl", tmp_path / "va3.jsonl", seed=2, near_threshold=None)
    assert (tmp_path / "va3.jsonl").read_bytes() != (tmp_path / "va.jsonl").read_bytes()
    assert other.leaks_near is None and other.leaks_exact == 0


def test_messy_file_keeps_duplicates_together(tmp_path):
    f = write_messy(tmp_path / "messy.jsonl")
    before = digest(f)
    r = split_file(f, tmp_path / "tr.jsonl", tmp_path / "va.jsonl", fraction=0.25, seed=0)
    assert r.input.invalid == INVALID and r.train + r.validation == VALID and not r.stratified
    assert r.grouped == 3 and r.leaks_exact == 0 and r.leaks_near == 0
    assert len(read_jsonl(tmp_path / "tr.rejects.jsonl")) == INVALID
    sides = {}
    for side in ("tr", "va"):
        for ex in read_examples(tmp_path / f"{side}.jsonl"):
            sides.setdefault(exact_key(ex), set()).add(side)
    assert all(len(s) == 1 for s in sides.values())
    assert digest(f) == before
    split_file(f, tmp_path / "tr2.jsonl", tmp_path / "va2.jsonl", fraction=0.25, seed=0)
    assert (tmp_path / "va2.jsonl").read_bytes() == (tmp_path / "va.jsonl").read_bytes()  # seeded


def test_assign_moves_whole_groups_and_hits_the_target():
    roots = [0, 0, 0, 3, 4, 5, 6, 7, 8, 9]
    val = assign(roots, [0] * 10, 1, 0.2, seed=5, stratified=False)
    assert val.sum() == 2 and len(set(val[:3])) == 1
    assert assign(roots, [0] * 10, 1, 0.2, seed=5, stratified=False).tolist() == val.tolist()


def test_bad_arguments(tmp_path, chat_file):
    with pytest.raises(LoraforgeError, match="between 0 and 1"):
        split_file(chat_file, tmp_path / "a", tmp_path / "b", fraction=1.5)
    with pytest.raises(LoraforgeError, match="overwrite an input"):
        split_file(chat_file, chat_file, tmp_path / "b")


def test_parallel_pass_equals_the_sequential_one(tmp_path, monkeypatch):
    from loraforge.data import scan

    f = write_messy(tmp_path / "messy.jsonl")
    with f.open("a") as out:  # more records, so that every worker gets some
        for i in range(300):
            out.write(json.dumps(msg(("user", f"question {i % 250}"), ("assistant", f"label{i % 250 % 3}"))) + "\n")
    reports, calls, real = {}, [], scan._parallel

    def spy(*args):
        calls.append(args[-1])
        yield from real(*args)

    monkeypatch.setattr(scan, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(scan, "_parallel", spy)
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        r = split_file(f, d / "train.jsonl", d / "val.jsonl", near_threshold=None, dedup=True, workers=workers)
        reports[workers] = {k: v for k, v in r.to_dict().items() if not k.endswith("path")}
        reports[workers]["input"].pop("rejects_path")
    assert reports[1] == reports[2] and reports[1]["removed"] == 50 + 2 and calls == [2]
    for name in ("train.jsonl", "val.jsonl", "train.rejects.jsonl", "train.removed.jsonl"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name

"""`loraforge eval --resume`: an evaluation interrupted after N streamed rows, resumed, ends with the same
numbers as one that ran in one go, and generates only what was missing; other settings reuse nothing."""

from __future__ import annotations

import json

import pytest
from conftest import chat_rows, copy_run, write_jsonl

from loraforge.cli import main
from loraforge.eval import stream
from loraforge.eval.run import evaluate_run

KW = {"limit": 6, "regression": False, "fewshot": 1, "batch_size": 2, "log": lambda m: None}


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("resume") / "test.jsonl", chat_rows(6))


@pytest.fixture(scope="module")
def whole(tiny_run, test_file, tmp_path_factory):
    return evaluate_run(tiny_run, test=test_file, out=tmp_path_factory.mktemp("whole"), **KW)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _same_numbers(a, b) -> None:
    assert a.models == b.models and a.comparisons == b.comparisons
    assert [e["answers"] for e in a.examples] == [e["answers"] for e in b.examples]


def test_interrupted_then_resumed_equals_one_go(tiny_run, test_file, whole, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    written = []
    real_write = stream.ResultLog.write

    def dying_write(self, row):
        if len(written) == 7:                   # mid-way through the few-shot model's batches
            raise KeyboardInterrupt
        written.append(row)
        real_write(self, row)

    monkeypatch.setattr(stream.ResultLog, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(tiny_run, test=test_file, out=out, **KW)
    monkeypatch.undo()
    kept = _rows(out / "results.jsonl")
    assert [(x["model"], x["index"]) for x in kept] == [("base", i) for i in range(6)] + [("fewshot", 0)]
    assert not (out / "eval.json").exists()

    with (out / "results.jsonl").open("a") as f:   # a line cut short by the kill
        f.write('{"model": "fewshot", "index": 1, "answ')
    r = evaluate_run(tiny_run, test=test_file, out=out, resume=True, **KW)
    assert r.resumed_rows == 6                   # the base model's 3 full batches; few-shot batch 0 was partial
    _same_numbers(r, whole)
    rows = _rows_safe(out / "results.jsonl")
    assert len(rows) == len(kept) + 2 * 6              # the few-shot batch 0 again, then 2 more + 3 fine-tuned
    for m in ("base", "fewshot", "finetuned"):
        assert {x["index"] for x in rows if x["model"] == m} == set(range(6))
    assert sum(x["model"] == "base" for x in rows) == 6   # nothing generated twice for the base model

    again = evaluate_run(tiny_run, test=test_file, out=out, resume=True, **KW)
    assert again.resumed_rows == 18 and again.models == whole.models


def _rows_safe(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_other_settings_reuse_nothing(tiny_run, test_file, whole, tmp_path):
    out = tmp_path / "ev"
    evaluate_run(tiny_run, test=test_file, out=out, **KW)
    r = evaluate_run(tiny_run, test=test_file, out=out, resume=True, **{**KW, "batch_size": 3})
    assert r.resumed_rows == 0
    r = evaluate_run(tiny_run, test=test_file, out=out, **KW)          # without --resume: starts afresh
    assert r.resumed_rows == 0 and len(_rows(out / "results.jsonl")) == 18


def test_cli_resume(tiny_run, test_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["eval", str(tiny_run), "--test", str(test_file), "--limit", "2", "--no-regression", "--out", str(out)]
    assert main(args) == 0
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "eval.json").read_text())["resumed_rows"] == 6


def test_sigterm_mid_eval_then_resume(tiny_run, tmp_path):
    """A real `loraforge eval` process killed with SIGTERM after some rows; --resume finishes it with the
    numbers of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = copy_run(tiny_run, tmp_path / "run", batch_size=1, max_new_tokens=12)
    rows = chat_rows(24)
    for i, row in enumerate(rows):                  # all prompts distinct, so every row is its own
        row["messages"][0]["content"] += f" (question {i})"
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "eval", str(run), "--test", str(test),
                             "--no-regression", "--fewshot", "0", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 10:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    code = proc.wait(timeout=60)
    if code == 0:
        pytest.skip("the evaluation finished before it could be killed")
    assert code == -signal.SIGTERM and not (out / "eval.json").exists()
    done = len(_rows_safe(results))
    assert 10 <= done < 120
    r = evaluate_run(run, test=test, regression=False, fewshot=0, out=out, resume=True, log=lambda m: None)
    assert r.resumed_rows == done
    whole = evaluate_run(run, test=test, regression=False, fewshot=0, out=tmp_path / "whole", log=lambda m: None)
    _same_numbers(r, whole)

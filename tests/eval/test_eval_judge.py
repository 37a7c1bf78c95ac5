"""The LLM judge inside `loraforge eval`, against real HTTP servers on 127.0.0.1.

The fake judge answers deterministically from the prompt it is sent: in a pairwise prompt it prefers
the longer answer ([[C]] when equally long), in a rubric prompt it rates 1 + the answer's word count
(at most 10). A question containing SLOW makes it sleep past the client's timeout, one containing
GARBAGE makes it answer with a body that is not JSON. The expected win/tie/loss numbers are worked
out here from the answers in eval.json, by hand, and compared with what the evaluation reports.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from judge_helpers import send_reply
from conftest import chat_rows, copy_run, write_jsonl

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.eval.run import evaluate_run

TIMEOUT = 0.3
PAIR = re.compile(r"\[The Start of Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\].*"
                  r"\[The Start of Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]", re.S)
ONE = re.compile(r"\[The Start of the Answer\]\n(.*)\n\[The End of the Answer\]", re.S)


def judge_reply(text: str) -> str:
    m = PAIR.search(text)
    if m:
        a, b = m.group(1), m.group(2)
        return "Longer is better here. " + ("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")
    answer = ONE.search(text).group(1)
    return f"Rating: [[{min(10, 1 + len(answer.split()))}]]"


def serve(always_sleep: bool = False):
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            question = text.split("[The Start of")[0]
            seen.append(text)
            if always_sleep or "SLOW" in question:
                time.sleep(TIMEOUT * 3)
            payload = b"<html>502 bad gateway</html>" if "GARBAGE" in question else json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": judge_reply(text)}}]}).encode()
            send_reply(self, payload)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", seen


@pytest.fixture(scope="module")
def judge():
    server, url, seen = serve()
    yield url, seen
    server.shutdown()


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    rows = chat_rows(6)
    rows[4]["messages"][0]["content"] = "What colour is the SLOW apple?"
    rows[5]["messages"][0]["content"] = "What colour is the GARBAGE sky?"
    return write_jsonl(tmp_path_factory.mktemp("judge") / "test.jsonl", rows)


def _copy_with(run, tmp_path, **eval_fields):
    return copy_run(run, tmp_path / "run", **eval_fields)


def test_judge_in_eval_win_tie_loss_by_hand(tiny_run, judge, test_file, tmp_path):
    url, seen = judge
    run = _copy_with(tiny_run, tmp_path, judge_timeout=TIMEOUT, max_new_tokens=8)
    out = tmp_path / "ev"
    r = evaluate_run(run, test=test_file, judge_url=url, judge_model="fake-judge", regression=False, fewshot=1,
                     out=out, log=lambda m: None)
    assert r.errors == [] and set(r.models) == {"base", "fewshot", "finetuned"}
    ex = r.examples
    tuned, base = [e["answers"]["finetuned"] for e in ex], [e["answers"]["base"] for e in ex]
    assert tuned != base                                         # the adapter changes the answers
    want = ["win" if len(t) > len(b) else "loss" if len(t) < len(b) else "tie" for t, b in zip(tuned[:4], base[:4])]
    pw = r.judge["pairwise"]
    assert [p["verdict"] for p in pw["per_example"]] == want + ["error", "error"]
    assert (pw["judged"], pw["errors"]) == (4, 2) and (pw["a"], pw["b"]) == ("finetuned", "base")
    for k in ("win", "tie", "loss"):
        assert pw[k] == pytest.approx(want.count(k) / 4)
    assert "timed out" in pw["per_example"][4]["reason"] and "not an OpenAI" in pw["per_example"][5]["reason"]
    # position swapping: each judged pair was shown both ways round
    for t, b in zip(tuned[:4], base[:4]):
        shown = [PAIR.search(s).groups() for s in seen if PAIR.search(s) and f"\n{t}\n" in s and f"\n{b}\n" in s]
        assert (t, b) in shown and (b, t) in shown
    # rubric: 1 + word count, errors on the SLOW/GARBAGE examples, mean over the judged ones
    for name in ("base", "fewshot", "finetuned"):
        rub = r.judge["rubric"][name]
        scores = [min(10, 1 + len(e["answers"][name].split())) for e in ex[:4]]
        assert [p["score"] for p in rub["per_example"]] == scores + [None, None]
        assert rub["mean"] == pytest.approx(sum(scores) / 4) and rub["errors"] == 2
        assert rub["ci"][0] <= rub["mean"] <= rub["ci"][1]
    assert ex[0]["judge"]["pairwise"] == want[0] and ex[4]["judge"]["pairwise"] == "error"
    assert ex[5]["judge"]["rubric"]["finetuned"] == "error"
    # streamed per example to results.jsonl, and shown in the report (table + per-example column)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    judged = [x for x in rows if x["model"] == "judge:pairwise:finetuned_vs_base"]
    assert sorted(x["index"] for x in judged) == list(range(6))
    assert {x["index"]: x["verdict"] for x in judged} == dict(enumerate(want + ["error", "error"]))
    html = (out / "report.html").read_text()
    assert "id='judge-table'" in html and f"win {pw['win']:.0%} / tie {pw['tie']:.0%}" in html
    assert html.count("<td class='judge'>") == 6 and "timed out" in html

    # resume: verdicts already streamed are reused; only the two failed examples are asked again
    before = len(seen)
    r2 = evaluate_run(run, test=test_file, judge_url=url, judge_model="fake-judge", regression=False, fewshot=1,
                      out=out, resume=True, log=lambda m: None)
    assert r2.judge["pairwise"] == pw and r2.resumed_rows == 3 * 6 + 4 + 3 * 4
    asked = seen[before:]
    assert asked and all("SLOW" in s or "GARBAGE" in s for s in asked)


def test_a_judge_that_never_answers_does_not_kill_the_eval(tiny_run, test_file, tmp_path):
    server, url, seen = serve(always_sleep=True)
    try:
        run = _copy_with(tiny_run, tmp_path, judge_timeout=TIMEOUT, judge_mode="pairwise", max_new_tokens=4)
        r = evaluate_run(run, test=test_file, limit=2, judge_url=url, regression=False, fewshot=0,
                         out=tmp_path / "ev", log=lambda m: None)
    finally:
        server.shutdown()
    assert r.errors == [] and set(r.models) == {"base", "fewshot", "finetuned"}
    pw = r.judge["pairwise"]
    assert (pw["judged"], pw["errors"], pw["win"], pw["tie"], pw["loss"]) == (0, 2, 0.0, 0.0, 0.0)
    assert r.judge["rubric"] == {}                            # mode pairwise: no rubric requests
    assert all("timed out" in p["reason"] for p in pw["per_example"]) and len(seen) == 2


def test_cli_judge_flags_and_bad_settings(tiny_run, judge, test_file, tmp_path, capsys, monkeypatch):
    url, _ = judge
    out = tmp_path / "cli"
    code = main(["eval", str(tiny_run), "--test", str(test_file), "--limit", "3", "--no-regression",
                 "--judge-url", url, "--judge-model", "fake-judge", "--out", str(out)])
    assert code == 0 and "judge: finetuned vs base: win" in capsys.readouterr().out
    saved = json.loads((out / "eval.json").read_text())
    assert saved["judge"]["model"] == "fake-judge" and saved["judge"]["pairwise"]["judged"] == 3
    assert saved["config"]["eval"]["judge_url"] == url

    code = main(["eval", str(tiny_run), "--test", str(test_file), "--judge-url", "localhost:9", "--out",
                 str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "http://" in err and not (tmp_path / "bad" / "results.jsonl").exists()
    monkeypatch.delenv("LF_TEST_JUDGE_KEY", raising=False)
    run = _copy_with(tiny_run, tmp_path, judge_api_key_env="LF_TEST_JUDGE_KEY")
    with pytest.raises(LoraforgeError, match="LF_TEST_JUDGE_KEY is not set"):
        evaluate_run(run, test=test_file, judge_url=url, out=tmp_path / "nokey", log=lambda m: None)

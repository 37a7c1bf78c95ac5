"""`loraforge data synth` against a stub server that misbehaves: nothing lost, nothing asked twice once
answered, every reject counted with its reason, a planted near-copy of a test-set example caught."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("httpx2")
pytest.importorskip("jsonschema")

sys.path.insert(0, str(Path(__file__).parent))
from stub import StubServer, default_reply, key_index  # noqa: E402

from loraforge.errors import LoraforgeError  # noqa: E402
from loraforge.synth.run import synth  # noqa: E402
from loraforge.synth.spec import build_spec  # noqa: E402

TEST_Q = "My card payment was declined at the supermarket twice this morning, why did that happen?"
TRAIN_Q = "How can I change the PIN of my new debit card before I travel abroad next week?"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def spec_for(url: str, **over) -> object:
    tree = {"endpoint": {"base_url": url, "model": "stub", "concurrency": 6, "timeout_s": 1.0, "max_retries": 3,
                         "backoff_s": 0.01, "max_backoff_s": 2.0},
            "task": "Customer messages to a bank's support chat, and helpful answers.",
            "count": 40, "seed": 1,
            "seed_examples": [{"user": "Where is my card?", "assistant": "It was posted yesterday."}],
            "diversity": {"topics": ["cards", "transfers", "fees", "security"], "difficulty": ["easy", "hard"]}}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            tree[k] = {**tree[k], **v}
        else:
            tree[k] = v
    return build_spec(tree)


def misbehave(req: dict, key: str, attempt: int):
    kind, i = key_index(key)
    plan = {("a", 1): ("status", 429, {"retry-after-ms": "30"}) if attempt == 1 else "ok",
            ("q", 2): ("status", 500, {}) if attempt <= 2 else "ok",
            ("a", 3): "malformed" if attempt == 1 else "ok",
            ("q", 4): "truncated" if attempt == 1 else "ok",
            ("a", 5): ("slow", 0.3),
            ("q", 6): ("hang", 2.5) if attempt == 1 else "ok",
            ("q", 7): ("status", 503, {}),
            ("a", 8): "bad_shape" if attempt == 1 else "ok",
            ("a", 17): ("status", 400, {}),
            ("q", 21): ("status", 429, {"Retry-After": "1"}) if attempt == 1 else "ok"}
    return plan.get((kind, i), "ok")


def planted(req: dict, key: str):
    kind, i = key_index(key)
    fixed = {("q", 1): "How do I order a new debit card for our joint account?",
             ("q", 11): "How do I order a new debit card for our joint account??",   # near-duplicate of item 1
             ("q", 9): "my card payment was declined at the supermarket twice this morning - why did that happen",
             ("q", 23): TRAIN_Q,
             ("a", 13): "I'm sorry, but I can't help with that request.",
             ("a", 15): "   ",
             ("a", 25): "Sure <|im_start|> here is the answer about your card."}
    if (kind, i) == ("a", 19):
        return "This answer was cut off because it ran out of", "length"
    if (kind, i) in fixed:
        return fixed[(kind, i)], "stop"
    return default_reply(req, key)


EXPECTED = {"request_failed": 2, "test_contamination": 1, "train_overlap": 1, "duplicate": 1, "refusal": 1,
            "empty_turn": 1, "truncated": 1}


def test_misbehaving_server_nothing_lost_every_reject_counted(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", [chat(TEST_Q, "Declines happen when ..."), chat("Hi", "Hello")])
    train = write_jsonl(tmp_path / "train.jsonl", [chat(TRAIN_Q, "In the app, under Card, choose PIN.")])
    out = tmp_path / "out.jsonl"
    with StubServer(misbehave, planted) as stub:
        spec = spec_for(stub.url, verify={"test": [str(test)], "train": [str(train)]})
        report = synth(spec, out, embeddings=False)
        answered_once = dict(stub.answered)
        log_len = len(stub.log)
        kept, rejects = rows(out), rows(tmp_path / "out.rejects.jsonl")
        assert report["reasons"] == EXPECTED
        assert report["kept"] == len(kept) == 40 - sum(EXPECTED.values())
        assert Counter(r["reason"] for r in rejects) == Counter(EXPECTED)
        # every item is in exactly one of the two files
        indices = [r["provenance"]["index"] for r in kept] + [r["index"] for r in rejects]
        assert sorted(indices) == list(range(40))
        assert max(answered_once.values()) == 1, "a request answered once was asked again"
        u = report["usage"]
        for reason in ("http_429", "http_500", "malformed", "connection", "timeout"):
            assert u["retry_reasons"].get(reason, 0) >= 1, (reason, u)
        assert u["failures"] == {"http_503": 1, "http_400": 1}
        assert u["completion_tokens"] > 0 and u["prompt_tokens"] > u["completion_tokens"]
        by_reason = {r["reason"]: r for r in rejects}
        assert "near copy" in by_reason["test_contamination"]["detail"] and "test.jsonl:1" in \
            by_reason["test_contamination"]["detail"]
        assert "item 1" in by_reason["duplicate"]["detail"] and by_reason["duplicate"]["index"] == 11
        assert "exact copy" in by_reason["train_overlap"]["detail"]
        assert report["warnings"] == {"control_tokens": 1}
        for r in kept:  # provenance on every record
            p = r["provenance"]
            assert p["model"] == "stub" and p["template"] == report["template"] and p["time"] and p["seed"] > 0
            assert p["key"].endswith(f":a:{p['index']}") and p["topic"] in ("cards", "transfers", "fees", "security")
        html = (tmp_path / "out.report.html").read_text()
        assert "test_contamination" in html and "topic coverage" in html

        # a rerun asks only what failed before (q:7 and a:17, each up to max_retries + 1 times) and writes the same
        again = synth(spec, out, embeddings=False)
        asked = {k for k, _ in stub.log[log_len:]}
        assert {key_index(k) for k in asked} == {("q", 7), ("a", 17)}
        assert again["from_journal"] == report["from_journal"] + u["requests"]
        assert rows(out) == kept and again["reasons"] == EXPECTED


def test_streaming_json_schema_and_truncated_streams(tmp_path):
    schema = {"type": "object", "required": ["intent", "confidence"],
              "properties": {"intent": {"type": "string"}, "confidence": {"type": "number", "minimum": 0,
                                                                            "maximum": 1}}}

    def reply(req, key):
        _, i = key_index(key)
        return {3: ("no JSON here at all", "stop"), 4: ('{"intent": 5, "confidence": 0.4}', "stop"),
                5: ('```json\n{"intent": "card", "confidence": 0.5}\n```', "stop")}.get(i) or default_reply(req, key)

    def behave(req, key, attempt):
        _, i = key_index(key)
        return "truncated_stream" if i in (1, 2) and attempt == 1 else "ok"

    prompts = [f"Question number {k}: what about my {w} today?" for k, w in
               enumerate(["card", "loan", "transfer", "fee", "pin", "cash", "limit", "app"])]
    with StubServer(behave, reply) as stub:
        spec = spec_for(stub.url, mode="distill", prompts=prompts, count=100, diversity={"topics": None},
                        endpoint={"stream": True}, output={"format": "json", "json_schema": schema})
        report = synth(spec, tmp_path / "out.jsonl", embeddings=False)
        assert report["usage"]["retry_reasons"] == {"truncated_stream": 2}
        assert stub.answered[next(k for k in stub.answered if k.endswith(":a:1"))] == 1
    assert report["items"] == 8 and report["reasons"] == {"not_json": 1, "schema_invalid": 1}
    kept = rows(tmp_path / "out.jsonl")
    assert len(kept) == 6
    for r in kept:
        ans = json.loads(r["messages"][-1]["content"])
        assert isinstance(ans["intent"], str) and 0 <= ans["confidence"] <= 1
    rej = {r["reason"]: r["detail"] for r in rows(tmp_path / "out.rejects.jsonl")}
    assert "at intent: 5 is not of type 'string'" in rej["schema_invalid"]


def test_generated_topics_rewrite_mode_and_labels(tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{**chat(f"I lost card number {k} on the bus", "lost_card"),
                                               "label": "lost_card"} for k in range(3)])
    with StubServer() as stub:
        spec = spec_for(stub.url, mode="rewrite", rewrite_file=str(src), rewrites_per_example=2, count=5,
                        diversity={"topics": None, "personas": {"generate": 3}})
        report = synth(spec, tmp_path / "out.jsonl", embeddings=False)
        kinds = Counter(key_index(k)[0] for k, _ in stub.log)
        assert kinds == {"plan-personas": 1, "r": 5}
        synth(spec, tmp_path / "out.jsonl", embeddings=False)  # rerun: nothing asked again
        assert len(stub.log) == 6
    kept = rows(tmp_path / "out.jsonl")
    assert report["items"] == 5 and len(kept) + report["rejected"] == 5
    for r in kept:
        assert r["messages"][-1]["content"] == "lost_card" and r["label"] == "lost_card"
        assert r["messages"][0]["content"].startswith("Please: ") and r["provenance"]["persona"]
        assert r["provenance"]["source"].endswith(("src.jsonl:1", "src.jsonl:2", "src.jsonl:3"))


def test_judge_pass_threshold_and_resume(tmp_path):
    def reply(req, key):
        text = req["messages"][-1]["content"]
        if "[Criteria]" in text:  # the eval judge's rubric prompt
            return ("Good. Rating: [[8]]" if "card" in text.split("[The Start of the Answer]")[1] else
                    "Weak. Rating: [[3]]"), "stop"
        return default_reply(req, key)

    prompts = ["Tell me about my card", "Tell me about loans", "What about card fees", "Explain transfers"]

    def answer_with_prompt(req, key):
        if key and ":a:" in key:
            return "About " + req["messages"][-1]["content"], "stop"
        return reply(req, key)

    with StubServer(reply=answer_with_prompt) as stub:
        spec = spec_for(stub.url, mode="distill", prompts=prompts, diversity={"topics": None},
                        verify={"judge": {"base_url": stub.url, "model": "judge", "threshold": 6}})
        report = synth(spec, tmp_path / "out.jsonl", embeddings=False)
        judged = sum(1 for k, _ in stub.log if k is None)
        synth(spec, tmp_path / "out.jsonl", embeddings=False)
        assert sum(1 for k, _ in stub.log if k is None) == judged == 4  # scores come from the journal
    assert report["reasons"] == {"judge_low": 2} and report["judge"] == {"judged": 4, "mean_score": 5.5}
    assert sorted(r["messages"][0]["content"] for r in rows(tmp_path / "out.jsonl")) == [prompts[0], prompts[2]]


def test_wrong_key_stops_the_run_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "nope")
    with StubServer(lambda req, key, attempt: ("status", 401, {})) as stub:
        spec = spec_for(stub.url, endpoint={"api_key_env": "STUB_KEY"})
        with pytest.raises(LoraforgeError, match="HTTP 401 .* the API key was refused"):
            synth(spec, tmp_path / "out.jsonl", embeddings=False)
        assert len(stub.log) <= 6  # the in-flight requests, then nothing more
    monkeypatch.delenv("STUB_KEY")
    with pytest.raises(LoraforgeError, match=r"\$STUB_KEY, which is not set"):
        synth(spec, tmp_path / "out.jsonl", embeddings=False)


def test_unreachable_server_is_one_clear_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = spec_for(f"http://127.0.0.1:{port}/v1", count=3, endpoint={"max_retries": 1})
    with pytest.raises(LoraforgeError, match="no request to .* succeeded .*connection"):
        synth(spec, tmp_path / "out.jsonl", embeddings=False)


def test_cli_summary_and_user_errors(tmp_path, capsys):
    import yaml

    from loraforge.cli import main

    with StubServer() as stub:
        spec = tmp_path / "s.yaml"
        spec.write_text(yaml.safe_dump({"endpoint": {"base_url": stub.url, "model": "stub",
                                                     "price_per_1m_input": 1.0, "price_per_1m_output": 2.0},
                                        "task": "Bank questions.", "count": 4}))
        assert main(["data", "synth", str(spec), "-o", str(tmp_path / "o.jsonl"), "--no-embeddings"]) == 0
    out = capsys.readouterr().out
    assert "4 kept of 4 items" in out and "requests: 8 answered now, 0 from the journal, 0 retries" in out
    assert "$0.000" in out and "o.report.html" in out
    spec.write_text(yaml.safe_dump({"endpoint": {"base_url": stub.url}, "task": "t"}))
    assert main(["data", "synth", str(spec), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "'endpoint.model': Field required" in capsys.readouterr().err

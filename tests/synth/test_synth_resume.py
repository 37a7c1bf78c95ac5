"""Kill `loraforge data synth` mid-run (SIGKILL of the process), then resume: nothing the journal holds is
asked again, nothing is lost, no record is written twice; the spec, journal and small parts unit-tested."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytest.importorskip("httpx2")

sys.path.insert(0, str(Path(__file__).parent))
from stub import StubServer, key_index  # noqa: E402

from loraforge.errors import LoraforgeError  # noqa: E402
from loraforge.synth.client import retry_after  # noqa: E402
from loraforge.synth.journal import Journal  # noqa: E402
from loraforge.synth.run import synth  # noqa: E402
from loraforge.synth.spec import build_spec, load_spec  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
COUNT = 60


def journal_keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_bytes().splitlines() if line.endswith(b"}")]


def test_kill_mid_run_then_resume_asks_nothing_twice_and_loses_nothing(tmp_path):
    with StubServer(lambda req, key, attempt: ("slow", 0.04)) as stub:
        spec_path = tmp_path / "synth.yaml"
        spec_path.write_text(yaml.safe_dump({
            "endpoint": {"base_url": stub.url, "model": "stub", "concurrency": 4},
            "task": "Questions a bank's customers ask.", "count": COUNT,
            "diversity": {"topics": ["cards", "loans", "fees"]}}))
        out, journal = tmp_path / "out.jsonl", tmp_path / "out.journal.jsonl"
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        proc = subprocess.Popen([sys.executable, "-m", "loraforge", "data", "synth", str(spec_path), "-o", str(out),
                                 "--no-embeddings"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (journal.exists() and len(journal_keys(journal)) >= 40):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert not out.exists(), "the run finished before the kill: nothing was tested"
        at_kill = journal_keys(journal)
        assert len(at_kill) == len(set(at_kill)) and 40 <= len(at_kill) < 2 * COUNT
        with journal.open("ab") as f:  # a kill in the middle of a write leaves a torn line
            f.write(b'{"spec": "x", "key": "torn')
        before = len(stub.log)
        report = synth(load_spec(spec_path), out, embeddings=False)
        asked_after = [k for k, _ in stub.log[before:]]
    assert not set(asked_after) & set(at_kill), "a request the journal answered was asked again"
    assert len(asked_after) == len(set(asked_after)) == 2 * COUNT - len(at_kill)
    assert report["from_journal"] == len(at_kill) and report["asked_now"] == len(asked_after)
    # the in-flight requests at the kill were answered by the server but never journaled: at most `concurrency`
    assert sum(n - 1 for n in stub.answered.values() if n > 1) <= 4
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    rejected = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    indices = [r["provenance"]["index"] for r in kept] + [r["index"] for r in rejected]
    assert sorted(indices) == list(range(COUNT))
    assert len({r["provenance"]["key"] for r in kept}) == len(kept)
    keys = journal_keys(journal)
    assert len(keys) == len(set(keys)) == 2 * COUNT and not journal.read_bytes().count(b"torn")


def test_a_larger_count_reuses_every_answer_and_another_task_starts_afresh(tmp_path):
    with StubServer() as stub:
        tree = {"endpoint": {"base_url": stub.url, "model": "stub"}, "task": "Bank questions.", "count": 5,
                "mode": "distill", "prompts": [f"question {k} about cards and fees" for k in range(8)]}
        synth(build_spec(tree), tmp_path / "out.jsonl", embeddings=False)
        r = synth(build_spec({**tree, "count": 8, "endpoint": {**tree["endpoint"], "concurrency": 2}}),
                  tmp_path / "out.jsonl", embeddings=False)
        assert (r["from_journal"], r["asked_now"], r["kept"]) == (5, 3, 8)
        r = synth(build_spec({**tree, "task": "Other questions."}), tmp_path / "out.jsonl", embeddings=False)
        assert (r["from_journal"], r["asked_now"]) == (0, 5)
        assert Counter(key_index(k)[0] for k, _ in stub.log) == {"a": 13}


def test_journal_first_line_of_a_key_wins_and_torn_lines_are_cut(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path, "h1")
    j.append({"key": "h1:a:0", "content": "first"})
    j.append({"key": "h1:a:0", "content": "second"})
    j.close()
    with path.open("ab") as f:
        f.write(json.dumps({"spec": "h0", "key": "h0:a:0"}).encode() + b"\n" + b'{"spec": "h1", "ke')
    j = Journal(path, "h1")
    assert j.get("h1:a:0")["content"] == "first" and (j.resumed, j.other_specs, j.torn) == (1, 1, 1)
    j.append({"key": "h1:a:1", "content": "x"})
    j.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["h1:a:0", "h0:a:0", "h1:a:1"]
    path.write_text("not json\n")
    with pytest.raises(LoraforgeError, match="journal line 1 is not JSON"):
        Journal(path, "h1")


def test_retry_after_forms():
    from email.utils import formatdate

    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 8 <= retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10.5
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


def test_spec_errors_name_the_key(tmp_path):
    base = {"endpoint": {"base_url": "http://localhost:1/v1", "model": "m"}, "task": "t"}
    cases = [({**base, "endpoint": {**base["endpoint"], "modle": "x"}}, "unknown key 'endpoint.modle'. Did you mean "
              "'endpoint.model'"),
             ({**base, "mode": "distill"}, "mode 'distill' needs prompts"),
             ({**base, "endpoint": {"base_url": "localhost:8000", "model": "m"}}, "'endpoint.base_url': must start"),
             ({**base, "output": {"format": "json"}}, "needs output.json_schema"),
             ({**base, "output": {"format": "json", "json_schema": {"type": "objekt"}}}, "not a valid JSON Schema"),
             ({**base, "count": 0}, "'count': Input should be greater than or equal to 1"),
             ({**base, "answer": "topic"}, "answer 'topic' needs mode 'generate' and diversity.topics")]
    for tree, message in cases:
        with pytest.raises(LoraforgeError, match=None) as e:
            build_spec(tree, "synth.yaml")
        assert message in str(e.value) and str(e.value).startswith("synth.yaml: invalid config"), str(e.value)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**base, "mode": "distill", "prompts_file": "missing.txt"}))
    with pytest.raises(LoraforgeError, match="'prompts_file' file not found"):
        load_spec(p)


def test_one_run_per_journal(tmp_path):
    first = Journal(tmp_path / "j.jsonl", "h")
    with pytest.raises(LoraforgeError, match="another `data synth` run is writing this journal"):
        Journal(tmp_path / "j.jsonl", "h")
    first.close()
    Journal(tmp_path / "j.jsonl", "h").close()

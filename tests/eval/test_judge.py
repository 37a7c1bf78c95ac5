"""LLM-as-judge against a stub OpenAI-compatible server on 127.0.0.1 with canned answers.

The stub picks its reply from markers in the user message: SLOW sleeps past the client's timeout,
GARBAGE returns a body that is not JSON, NORATING answers without a rating, BIASED always prefers
position A, TIED answers [[C]]; otherwise a pairwise prompt prefers whichever position holds the
answer containing GOOD, and a rubric prompt is rated 7.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from judge_helpers import send_reply

from loraforge.errors import LoraforgeError
from loraforge.eval.llm_judge import (
    JudgeClient,
    PairwiseResult,
    combine_swapped,
    pairwise,
    parse_choice,
    parse_rating,
    rubric_scores,
    win_rates,
)

SLOW_SECONDS = 0.5
TIMEOUT = 0.15


def _canned(text: str) -> str:
    if "NORATING" in text:
        return "The answer seems fine overall."
    if "Assistant A's Answer" not in text:
        return "Clear and correct.\nRating: [[7]]"
    if "TIED" in text:
        return "Both are equally good. [[C]]"
    if "BIASED" in text:
        return "The first one reads better. [[A]]"
    a_slot = text.index("Assistant A's Answer]\n")
    b_slot = text.index("Assistant B's Answer]\n")
    good = text.index("GOOD", a_slot)
    return "[[A]]" if good < b_slot else "Assistant B is more accurate. [[B]]"


class _Judge(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None, dict]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("Authorization"), body))
        text = body["messages"][-1]["content"]
        if "SLOW" in text:
            time.sleep(SLOW_SECONDS)
        if "GARBAGE" in text:
            payload = b"<html>502 upstream exploded</html>"
        else:
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": _canned(text)}}]}).encode()
        send_reply(self, payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(base_url: str) -> JudgeClient:
    return JudgeClient(base_url, model="stub-judge", api_key="sk-test", timeout=TIMEOUT)


def test_parsers() -> None:
    assert parse_rating("ok\nRating: [[8]]") == 8.0
    assert parse_rating("[[3]] at first, but final Rating: [[9]]") == 9.0
    assert parse_rating("Score: 6/10") == 6.0
    assert parse_rating("Rating: [[11]]") is None and parse_rating("great") is None
    assert parse_choice("I pick [[B]]") == "B" and parse_choice("[[A]] no, [[C]]") == "C"
    assert parse_choice("A is better") is None


@pytest.mark.parametrize(
    ("first", "second", "verdict"),
    [("A", "B", "win"), ("B", "A", "loss"), ("A", "A", "tie"), ("B", "B", "tie"), ("C", "C", "tie"), ("A", "C", "tie")],
)
def test_position_swap_logic(first: str, second: str, verdict: str) -> None:
    assert combine_swapped(first, second) == verdict


def test_rubric_scores_and_per_example_errors(client: JudgeClient) -> None:
    prompts = ["What is 2+2?", "SLOW question", "GARBAGE please", "NORATING here", "Capital of France?"]
    answers = ["4", "x", "y", "z", "Paris"]
    started = time.monotonic()
    scores = rubric_scores(client, prompts, answers, references=["4", None, None, None, "Paris"])
    assert time.monotonic() - started < 2.0
    assert [s.verdict for s in scores] == ["ok", "error", "error", "error", "ok"]
    assert scores[0].score == 7.0 and scores[4].score == 7.0
    assert scores[1].reason == f"timed out after {TIMEOUT:g}s"
    assert "not an OpenAI chat completion" in scores[2].reason and "502 upstream" in scores[2].reason
    assert "no rating" in scores[3].reason and scores[3].raw == "The answer seems fine overall."


def test_request_shape(client: JudgeClient) -> None:
    _Judge.seen.clear()
    rubric_scores(client, ["q"], ["a"], rubric="Be strict.", references=["ref answer"])
    path, auth, body = _Judge.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "stub-judge" and body["temperature"] == 0.0
    user = body["messages"][-1]["content"]
    assert "Be strict." in user and "[Reference Answer]\nref answer" in user


def test_base_url_with_v1_and_bad_url() -> None:
    assert JudgeClient("http://h:1/v1/", "m").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeClient("http://h:1", "m").endpoint == "http://h:1/v1/chat/completions"
    with pytest.raises(LoraforgeError, match="http://"):
        JudgeClient("localhost:8000", "m")


def test_pairwise_swaps_positions(client: JudgeClient) -> None:
    prompts = ["q1", "q2", "BIASED q3", "TIED q4", "SLOW q5", "GARBAGE q6"]
    answers_a = ["GOOD answer", "BAD answer", "GOOD answer", "GOOD answer", "GOOD", "GOOD"]
    answers_b = ["BAD answer", "GOOD answer", "BAD answer", "BAD answer", "BAD", "BAD"]
    results = pairwise(client, prompts, answers_a, answers_b)
    assert [r.verdict for r in results] == ["win", "loss", "tie", "tie", "error", "error"]
    assert (results[0].first, results[0].second) == ("A", "B")  # A shown first wins, then B slot wins
    assert (results[2].first, results[2].second) == ("A", "A")  # position bias cancels to a tie
    assert results[4].reason.startswith("timed out")


def test_unreachable_judge_is_per_example_error() -> None:
    dead = JudgeClient("http://127.0.0.1:9", "m", timeout=TIMEOUT)  # discard port: nothing listens
    result = pairwise(dead, ["q"], ["a"], ["b"])[0]
    assert result.verdict == "error" and result.reason


def test_win_rates() -> None:
    verdicts = ["win", "win", "tie", "loss", "error"]
    rates = win_rates([PairwiseResult(v, "", "", "") for v in verdicts])  # type: ignore[arg-type]
    assert (rates.win, rates.tie, rates.loss, rates.judged, rates.errors) == (0.5, 0.25, 0.25, 4, 1)
    empty = win_rates([PairwiseResult("error", "", "", "boom")])
    assert (empty.win, empty.judged, empty.errors) == (0.0, 0, 1)

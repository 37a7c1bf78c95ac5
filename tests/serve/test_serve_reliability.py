"""The server loses nothing and hides nothing: a client that goes away cancels its request (streaming or
not), OpenAI's message shapes are understood or refused with a clear 400, a busy port is said before the
model loads, and `loraforge serve` prints where it listens."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

sys.path.insert(0, str(Path(__file__).parent))
from helpers import LiveServer, make_adapter  # noqa: E402

from loraforge.serve.server import BadRequest, chat_messages  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    from loraforge.serve.server import build_app, load_registry

    adapter = make_adapter(tiny_model, tmp_path_factory.mktemp("ad") / "a", 1)
    reg = load_registry(str(tiny_model), {"a": str(adapter)}, device="cpu", name="tiny")
    # a context far beyond the tiny model's 256 positions: requests that would decode for minutes
    with LiveServer(build_app(reg, max_batch=4, wait_ms=1, max_context=10**6)) as srv:
        yield srv, reg


def _post(srv, path, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _health(srv) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())["batching"]


def _wait_idle(srv, deadline_s=60) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        stats = _health(srv)
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.1)
    return _health(srv)


def _wait_running(srv, deadline_s=60) -> None:
    end = time.monotonic() + deadline_s
    while _health(srv)["running"] == 0:
        assert time.monotonic() < end, "the request never started"
        time.sleep(0.02)


LONG = {"model": "a", "messages": [{"role": "user", "content": "What colour is the sky?"}],
        "max_tokens": 200_000, "ignore_eos": True}


def test_disconnected_non_streaming_request_is_cancelled(server):
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(LONG), {"Content-Type": "application/json"})
    _wait_running(srv)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client gives up (as curl -m 3 does)
    conn.close()
    assert _wait_idle(srv)["running"] == 0  # not decoding to 200,000 tokens for nobody


def test_disconnected_streaming_request_is_cancelled(server):
    srv, _ = server
    conn, resp = _post(srv, "/v1/chat/completions", {**LONG, "stream": True})
    assert resp.status == 200
    resp.fp.readline()  # the first event arrived: decoding runs
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert _wait_idle(srv)["running"] == 0


def _answer(srv, body):
    conn, resp = _post(srv, "/v1/chat/completions" if "messages" in body else "/v1/completions",
                       {"model": "a", "max_tokens": 8, **body})
    return resp.status, json.loads(resp.read())


def test_list_of_parts_content_is_the_same_as_text(server):
    srv, _ = server
    plain = _answer(srv, {"messages": [{"role": "user", "content": "What colour is the sky?"}]})
    parts = _answer(srv, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What colour is the sky?"}]}]})
    assert plain[0] == parts[0] == 200
    assert parts[1]["choices"][0]["message"] == plain[1]["choices"][0]["message"]


def test_trailing_assistant_turn_is_continued(server):
    from loraforge.data.templates import prompt_text

    srv, reg = server
    user = {"role": "user", "content": "What colour is the sky?"}
    status, got = _answer(srv, {"messages": [user, {"role": "assistant", "content": "The sky"}]})
    assert status == 200
    status, ref = _answer(srv, {"prompt": prompt_text(reg.tokenizer, [user]) + "The sky"})
    assert got["choices"][0]["message"]["content"] == ref["choices"][0]["text"]
    assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]


@pytest.mark.parametrize("messages,match", [
    ([{"role": "tool", "content": "42", "tool_call_id": "x"}], "'tool' messages are not supported"),
    ([{"role": "wizard", "content": "hi"}], "role must be one of system, developer, user, assistant"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": None}], "must be a string or a list of text parts"),
    ([], "non-empty list"),
])
def test_bad_messages_are_a_clear_400(server, messages, match):
    status, body = _answer(server[0], {"messages": messages})
    assert status == 400 and match in body["error"]["message"]


def test_chat_messages_shapes():
    turns, started = chat_messages([{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}])
    assert turns == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    assert started == ""
    with pytest.raises(BadRequest) as e:
        chat_messages([{"role": "user", "content": "x"}, {"role": "function", "content": "y"}])
    assert e.value.param == "messages[1].role"


def test_decoding_raises_no_future_warnings(tiny_model, tmp_path):
    import threading

    from loraforge.serve.batching import BatchWorker, Job
    from loraforge.serve.server import load_registry

    adapter = make_adapter(tiny_model, tmp_path / "a", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = load_registry(str(tiny_model), {"a": str(adapter)}, device="cpu", name="tiny")
        worker = BatchWorker(reg)
        done = threading.Event()
        worker.submit(Job([5, 6, 7], "a", 4, lambda d, f: f and done.set()))
        assert done.wait(60)
        worker.close()
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_busy_port_is_said_before_the_model_loads(tmp_path, capsys):
    from loraforge.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        code = main(["serve", "--base", str(tmp_path / "no-such-model"), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"127.0.0.1:{port}: the port is in use" in err and "no-such-model" not in err


def test_serve_prints_where_it_listens(tiny_model):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", "--base", str(tiny_model), "--port", "0",
                             "--model-name", "tiny"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        for line in proc.stderr:
            if line.startswith("serving"):
                break
        assert line.startswith("serving tiny on http://127.0.0.1:") and "Ctrl-C to stop" in line, line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""`loraforge serve` against a live server on 127.0.0.1, driven by the official `openai` client: every
endpoint, streaming, no adapter mix-ups under concurrent requests, admin load/unload, API key, bad input."""

from __future__ import annotations

import http.client
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

sys.path.insert(0, str(Path(__file__).parent))
from helpers import LiveServer, make_adapter  # noqa: E402

KEY = "test-key"
PROMPTS = ["What colour is the sky?", "What colour is the apple?", "Tell me about snow and white things."]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    from loraforge.serve.server import build_app, load_registry

    d = tmp_path_factory.mktemp("adapters")
    adapters = {n: str(make_adapter(tiny_model, d / n, seed)) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    other = make_adapter(tiny_model, d / "other-base", 4, hidden=32)
    reg = load_registry(str(tiny_model), {"a": adapters["a"], "b": adapters["b"]}, device="cpu", name="tiny")
    with LiveServer(build_app(reg, api_key=KEY, max_batch=8, wait_ms=10)) as srv:
        yield srv, adapters, other, reg


@pytest.fixture(scope="module")
def reference(tiny_model, setup):
    """What each model alone answers (plain PEFT, one adapter, no server)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.eval.generate import build_messages, generate_batch
    from loraforge.model.adapters import load_adapter
    from loraforge.model.load import load_tokenizer

    _, adapters, _, _ = setup
    tok = load_tokenizer(str(tiny_model))
    out = {}
    for name in ("tiny", "a", "b", "c"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        if name != "tiny":
            model = load_adapter(model, adapters[name])
        gens = generate_batch(model, tok, [build_messages(p, None) for p in PROMPTS], max_new_tokens=10, batch_size=1)
        out[name] = [g.text for g in gens]
    assert len({tuple(v) for v in out.values()}) == 4  # the adapters really answer differently
    return out


def client(srv, key=KEY):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def ask(c, model, prompt, stream=False, max_tokens=10):
    msgs = [{"role": "user", "content": prompt}]
    if not stream:
        return c.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens).choices[0].message.content
    chunks = c.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, stream=True)
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def raw(srv, method, path, body=b"", key=KEY):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {key}",
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def test_models_health_and_each_adapter_answers_like_it_does_alone(setup, reference):
    srv, *_ = setup
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny", "a", "b"]
    status, health = raw(srv, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    for name in ("tiny", "a", "b"):
        for i, p in enumerate(PROMPTS):
            assert ask(c, name, p).strip() == reference[name][i]
            assert ask(c, name, p, stream=True).strip() == reference[name][i]


def test_completions_endpoint(setup):
    srv, *_ = setup
    c = client(srv)
    r = c.completions.create(model="a", prompt="What colour is the sky?", max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="a", prompt="What colour is the sky?", max_tokens=5, stream=True))
    assert streamed == r.choices[0].text


def test_concurrent_mixed_adapters_never_mix_up(setup, reference):
    srv, *_ = setup
    c = client(srv)
    rng = random.Random(0)
    work = [(rng.choice(["tiny", "a", "b"]), rng.randrange(len(PROMPTS)), rng.random() < 0.5) for _ in range(36)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda w: ask(c, w[0], PROMPTS[w[1]], stream=w[2]), work))
    wrong = [(w, a) for w, a in zip(work, answers) if a.strip() != reference[w[0]][w[1]]]
    assert not wrong
    status, health = raw(srv, "GET", "/health")
    assert health["batching"]["max_rows"] > 1  # requests really were decoded together


def test_admin_load_and_unload_at_run_time(setup, reference):
    srv, adapters, _, _ = setup
    c = client(srv)
    status, body = raw(srv, "POST", "/admin/adapters", json.dumps({"name": "c", "path": adapters["c"]}).encode())
    assert status == 201 and "c" in body["models"]
    assert ask(c, "c", PROMPTS[0]).strip() == reference["c"][0]
    assert ask(c, "a", PROMPTS[0]).strip() == reference["a"][0]
    status, _ = raw(srv, "POST", "/admin/adapters", json.dumps({"name": "c", "path": adapters["c"]}).encode())
    assert status == 409
    status, body = raw(srv, "DELETE", "/admin/adapters/c")
    assert status == 200 and "c" not in body["models"]
    with pytest.raises(openai.NotFoundError):
        ask(c, "c", PROMPTS[0])
    assert raw(srv, "DELETE", "/admin/adapters/c")[0] == 404
    assert ask(c, "b", PROMPTS[1]).strip() == reference["b"][1]


def test_api_key_required(setup):
    srv, *_ = setup
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        ask(client(srv, key="wrong"), "a", PROMPTS[0])
    assert raw(srv, "POST", "/admin/adapters", b"{}", key="wrong")[0] == 401


def test_bad_requests_are_clear_4xx_and_the_server_keeps_serving(setup, reference):
    srv, *_ = setup
    c = client(srv)
    status, body = raw(srv, "POST", "/v1/chat/completions", b'{"model": "a", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(c, "nope", PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(c, "a", "sky " * 300)
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(c, "a", PROMPTS[0], max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(c, "a", PROMPTS[0], max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="a", messages=[{"role": "user"}], max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="empty"):
        c.completions.create(model="a", prompt="", max_tokens=3)
    assert raw(srv, "GET", "/v1/nothing")[0] == 404
    assert ask(c, "a", PROMPTS[2]).strip() == reference["a"][2]


def test_client_disconnecting_mid_stream(setup, reference):
    srv, _, _, reg = setup
    before = set(reg.adapters)
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        body = json.dumps({"model": "b", "messages": [{"role": "user", "content": PROMPTS[0]}],
                           "max_tokens": 200, "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()  # the first event, then hang up
        conn.sock.close()
        conn.close()
    time.sleep(0.3)
    assert ask(client(srv), "b", PROMPTS[0]).strip() == reference["b"][0]
    assert set(reg.adapters) == before and reg.lock.acquire(timeout=5)
    reg.lock.release()


def test_bad_adapter_folders_are_refused_and_leave_nothing_behind(setup, reference, tmp_path):
    srv, _, other, reg = setup
    c = client(srv)
    status, body = raw(srv, "POST", "/admin/adapters",
                       json.dumps({"name": "gone", "path": str(tmp_path / "missing")}).encode())
    assert status == 400 and "adapter_config.json" in body["error"]["message"]
    status, body = raw(srv, "POST", "/admin/adapters", json.dumps({"name": "x", "path": str(other)}).encode())
    assert status == 400 and "does not fit the base model" in body["error"]["message"]
    assert [m.id for m in c.models.list().data] == ["tiny", "a", "b"]
    assert not any("x" in n or "gone" in n for n in getattr(reg.model, "peft_config", {}))
    for name in ("tiny", "a", "b"):
        assert ask(c, name, PROMPTS[1]).strip() == reference[name][1]


def test_cli_reports_a_bad_adapter_without_a_traceback(tiny_model, setup, tmp_path, capsys):
    from loraforge.cli import main

    _, _, other, _ = setup
    assert main(["serve", "--base", str(tiny_model), "--adapter", f"x={tmp_path / 'missing'}"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert main(["serve", "--base", str(tiny_model), "--adapter", f"x={other}"]) == 2
    assert "does not fit the base model" in capsys.readouterr().err
    assert main(["serve", "--base", str(tiny_model), "--adapter", "no-equals-sign"]) == 2


def test_error_bodies_and_which_routes_need_the_key(setup):
    srv, adapters, _, _ = setup
    status, body = raw(srv, "POST", "/admin/adapters", json.dumps({"name": "a", "path": adapters["a"]}).encode())
    assert status == 409 and body["error"]["param"] == "path" and body["error"]["code"] == "adapter_load_failed"
    status, body = raw(srv, "DELETE", "/admin/adapters/zz")
    assert status == 404 and body["error"]["param"] == "name" and body["error"]["code"] == "model_not_found"
    status, body = raw(srv, "DELETE", "/admin/adapters/a", key="wrong")
    assert status == 401 and body["error"] == {"message": "missing or wrong API key", "type": "authentication_error",
                                               "param": None, "code": "invalid_api_key"}
    assert raw(srv, "GET", "/health", key="wrong")[0] == 200  # a probe carries no key
    status, body = raw(srv, "GET", "/v1/nothing", key="wrong")
    assert status == 404 and body["error"]["message"] == "GET /v1/nothing: Not Found"
    status, body = raw(srv, "POST", "/admin/adapters", b'{"name": 3}')
    assert status == 400 and body["error"]["param"] == "name"
    assert [m["id"] for m in raw(srv, "GET", "/v1/models")[1]["data"]] == ["tiny", "a", "b"]

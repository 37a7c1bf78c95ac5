"""Sampling parameters through the official `openai` client against a live server: temperature, top_p,
seed, stop strings (plain and streamed), n, and the 400 errors in OpenAI's shape for bad values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

sys.path.insert(0, str(Path(__file__).parent))
from helpers import LiveServer, make_adapter  # noqa: E402

MSGS = [{"role": "user", "content": "What colour is the sky?"}]
LONG = {"ignore_eos": True}  # decode the full max_tokens, so there is text to cut


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    from loraforge.serve.server import build_app, load_registry

    a = make_adapter(tiny_model, tmp_path_factory.mktemp("sampling") / "a", 1)
    reg = load_registry(str(tiny_model), {"a": str(a)}, device="cpu", name="tiny")
    with LiveServer(build_app(reg, max_batch=8, wait_ms=5)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat(c, stream=False, **kw):
    kw = {"model": "a", "messages": MSGS, "max_tokens": 20, "extra_body": LONG, **kw}
    if not stream:
        choice = c.chat.completions.create(**kw).choices[0]
        return choice.message.content, choice.finish_reason
    finish, deltas = None, []
    for ch in c.chat.completions.create(stream=True, **kw):
        if ch.choices:
            deltas.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    return "".join(deltas), finish


def test_greedy_by_default_and_temperature_zero(client):
    greedy, finish = chat(client)
    assert finish == "length" and greedy
    assert chat(client, temperature=0)[0] == greedy
    assert chat(client, temperature=0, seed=7, top_p=0.5)[0] == greedy
    # top_p so small that only the most likely token survives: sampling turns into greedy decoding
    assert chat(client, temperature=1.0, top_p=1e-9, seed=3)[0] == greedy


def test_same_seed_same_answer_other_seeds_differ(client):
    answers = [chat(client, temperature=1.5, seed=s)[0] for s in (11, 11, 12, 13, 14)]
    assert answers[0] == answers[1]
    assert len(set(answers)) >= 3
    assert chat(client, stream=True, temperature=1.5, seed=11)[0] == answers[0]
    assert chat(client, temperature=1.5, top_p=0.8, seed=11)[0] == chat(client, temperature=1.5, top_p=0.8, seed=11)[0]
    comp = [client.completions.create(model="a", prompt="The sky is", max_tokens=12, temperature=1.2, seed=5,
                                      extra_body=LONG).choices[0].text for _ in range(2)]
    assert comp[0] == comp[1] and comp[0]


def test_stop_strings_cut_the_answer_before_them(client):
    full, _ = chat(client)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip()
    want = full[:full.find(stop)]
    for stream in (False, True):
        text, finish = chat(client, stream=stream, stop=stop)
        assert (text, finish) == (want, "stop")
    other = full[len(full) // 3:len(full) // 3 + 2]  # a list: the earliest stop string wins
    text, finish = chat(client, stop=[stop, other, "never-said-xyz"])
    assert (text, finish) == (full[:min(full.find(stop), full.find(other))], "stop")
    assert chat(client, stop="never-said-xyz") == (full, "length")
    r = client.completions.create(model="a", prompt="The sky is", max_tokens=20, extra_body=LONG)
    cut = r.choices[0].text[4:6]
    r2 = client.completions.create(model="a", prompt="The sky is", max_tokens=20, stop=cut, extra_body=LONG)
    assert r2.choices[0].text == r.choices[0].text[:r.choices[0].text.find(cut)]
    assert r2.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw, param", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"n": 2}, "n"), ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
    ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
])
def test_bad_sampling_values_are_400_in_openai_shape(client, kw, param):
    for call in (lambda: client.chat.completions.create(model="a", messages=MSGS, **{"max_tokens": 5, **kw}),
                 lambda: client.completions.create(model="a", prompt="sky", **{"max_tokens": 5, **kw})):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        err = e.value.response.json()["error"]
        assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"
    assert chat(client, max_tokens=3)[1] == "length"  # and the server keeps serving

"""`loraforge serve` with OpenAI's `response_format` through the official client: json_schema answers satisfy
the schema, json_object answers are objects, streamed or not, beside plain requests in the same batch (whose
answers do not change), and a bad response_format is a clear 400."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

sys.path.insert(0, str(Path(__file__).parent))
from helpers import LiveServer, make_adapter  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "sure"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"},
                         "why": {"type": "string", "maxLength": 8}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "colour", "schema": SCHEMA, "strict": True}}
PROMPTS = [f"What colour is thing number {i}?" for i in range(8)]


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    from loraforge.serve.server import build_app, load_registry

    adapter = make_adapter(tiny_model, tmp_path_factory.mktemp("ad") / "a", 1)
    reg = load_registry(str(tiny_model), {"a": str(adapter)}, device="cpu", name="tiny")
    with LiveServer(build_app(reg, max_batch=8, wait_ms=50)) as s:
        yield s


def _client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _ask(c, model, prompt, fmt=None, stream=False):
    kw = {"response_format": fmt} if fmt else {}
    msgs = [{"role": "user", "content": prompt}]
    if stream:
        chunks = c.chat.completions.create(model=model, messages=msgs, max_tokens=60, stream=True, **kw)
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), None
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=60, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_json_schema_beside_plain_requests_in_one_batch(srv):
    c = _client(srv)
    alone = {p: _ask(c, "a", p)[0] for p in PROMPTS[:3]}
    jobs = [(m, p, FORMAT if k % 2 else None, k % 3 == 0) for k, p in enumerate(PROMPTS) for m in ("tiny", "a")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: (j, _ask(c, j[0], j[1], j[2], j[3])), jobs))
    for (model, prompt, fmt, stream), (text, finish) in got:
        if fmt:
            jsonschema.validate(json.loads(text), SCHEMA)
            assert finish in (None, "stop")
        elif model == "a" and prompt in alone:
            assert text == alone[prompt]               # a neighbour's grammar never touches this row
    assert any(json.loads(t)["colour"] for (_, _, f, _), (t, _) in got if f)


def test_json_object_and_text(srv):
    c = _client(srv)
    for p in PROMPTS[:4]:   # a random model's free-text keys may run to max_tokens: then it is cut, not invalid
        text, finish = _ask(c, "tiny", p, {"type": "json_object"})
        assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))
    assert _ask(c, "tiny", PROMPTS[0], {"type": "text"})[0] == _ask(c, "tiny", PROMPTS[0])[0]


def test_bad_response_format_is_a_clear_400(srv):
    c = _client(srv)
    for fmt, words in (({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "must be a JSON Schema object"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                        "cannot be decoded")):
        with pytest.raises(openai.BadRequestError) as e:
            _ask(c, "tiny", "hi", fmt)
        assert words in str(e.value) and e.value.body["param"] == "response_format"
    assert _ask(c, "tiny", "still serving?")[1] in ("stop", "length")

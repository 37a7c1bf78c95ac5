"""Request validation for the server: an OpenAI request body in, a `Parsed` request (prompt ids, adapter,
sampling, structure) out, or a BadRequest (serve/errors.py) naming the parameter that is wrong. No HTTP
here: app.py reads the body and turns the errors into responses."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from loraforge.data.templates import prompt_text
from loraforge.errors import LoraforgeError
from loraforge.eval.structured import Structure, compile_structure
from loraforge.serve.decoding import Sampling
from loraforge.serve.errors import BadRequest
from loraforge.serve.registry import Registry

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 invalid_json."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high and (
        value > low if low_open else value >= low)
    if not ok:
        raise BadRequest(400, f"{key} must be a number {'>' if low_open else '>='} {low:g} and <= {high:g}, "
                              f"got {value!r}", param=key)
    return float(value)


def parse_sampling(body: dict) -> Sampling:
    """The request's sampling settings, or a BadRequest naming the parameter that is wrong."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest(400, f"only n=1 is supported, got {n!r}; send one request per answer", param="n")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(400, f"seed must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
        raise BadRequest(400, f"stop must be a non-empty string or a list of up to 4 of them, got {stop!r}",
                         param="stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest(400, f"ignore_eos must be true or false, got {ignore_eos!r}", param="ignore_eos")
    return Sampling(temperature=temperature, top_p=top_p, seed=None if seed is None else seed % 2**63,
                    stop=tuple(stops), ignore_eos=ignore_eos)


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(400, f"messages[{i}].content[{j}]: only text parts are supported "
                                      f"(got type {kind!r})", param=f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest(400, f"messages[{i}].content must be a string or a list of text parts, got {content!r}",
                     param=f"messages[{i}].content")


def chat_messages(msgs) -> tuple[list[dict], str]:
    """The request's messages as {role, content} turns, and the text of a last assistant turn to continue
    ("" when the last turn is not the assistant's); a BadRequest names the message that is wrong."""
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("tool", "function"):
            raise BadRequest(400, f"messages[{i}]: '{role}' messages are not supported (this server does not "
                                  f"call tools)", param=f"messages[{i}].role")
        if role not in ROLES:
            raise BadRequest(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                             param=f"messages[{i}].role")
        turns.append({"role": ROLES[role], "content": _content(m, i)})
    if turns[-1]["role"] == "assistant":
        return turns, turns[-1]["content"]
    return turns, ""


def context_limit(model, override: int | None = None) -> int:
    """Most tokens (prompt + answer) the model takes: its max_position_embeddings (2048 when unknown)."""
    cfg = getattr(model, "config", None)
    return override or getattr(cfg, "max_position_embeddings", None) or 2048


def parse_response_format(body: dict) -> Structure | None:
    """The request's Structure (loraforge.eval.structured), None for plain text, or a BadRequest."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Structure(schema={"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest(400, "response_format.json_schema.schema must be a JSON Schema object",
                             param="response_format")
        return Structure(schema=schema)
    raise BadRequest(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                     param="response_format")


@dataclass
class Parsed:
    """A valid generation request, ready to become a batching Job."""

    model: str                         # the name the client asked for (an adapter or the base)
    adapter: str                       # the registry's adapter name (registry.BASE for the base)
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    structure: Structure | None        # response_format, None for plain text
    stream: bool


def _model_name(body: dict, registry: Registry) -> str:
    name = body.get("model")
    if name is None:
        raise BadRequest(400, f"the request names no model: give \"model\", one of {', '.join(registry.names())}",
                         param="model", code="missing_model")
    if not isinstance(name, str) or not registry.knows(name):
        raise BadRequest(404, f"the model '{name}' does not exist; available: {', '.join(registry.names())}",
                         param="model", code="model_not_found")
    return name


def _max_tokens(body: dict) -> int:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 128))
    if max_tokens is None:
        max_tokens = 128
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    return max_tokens


def _prompt_text(body: dict, tokenizer, chat: bool) -> str:
    if chat:
        turns, started = chat_messages(body.get("messages"))
        return prompt_text(tokenizer, turns) + started  # prompt_text leaves a last assistant turn out
    text = body.get("prompt")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise BadRequest(400, "prompt must be one string", param="prompt")
    return text


def parse_request(body: dict, *, chat: bool, registry: Registry, limit: int) -> Parsed:
    """A /v1/chat/completions (chat) or /v1/completions body, checked in the order the errors are reported:
    model, max_tokens, sampling, messages or prompt, context length, response_format."""
    name = _model_name(body, registry)
    max_tokens = _max_tokens(body)
    sampling = parse_sampling(body)
    tok = registry.tokenizer
    ids = tok(_prompt_text(body, tok, chat), add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadRequest(400, "the prompt is empty; give at least one token", param="prompt")
    if len(ids) + max_tokens > limit:
        raise BadRequest(400, f"this request needs {len(ids)} prompt + {max_tokens} completion tokens, "
                              f"more than the model's context of {limit}; shorten it or lower max_tokens",
                         param="max_tokens", code="context_length_exceeded")
    return Parsed(model=name, adapter=registry.adapter_for(name), prompt_ids=ids, max_tokens=max_tokens,
                  sampling=sampling, structure=parse_response_format(body), stream=bool(body.get("stream")))


class Grammars:
    """Compiled grammars by schema (the most recent 64), shared by the requests that use the same one."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        self.tokenizer, self.stops, self.cache, self.lock = tokenizer, stop_ids, {}, threading.Lock()

    def get(self, structure: Structure):
        key = json.dumps([structure.labels, structure.schema], sort_keys=True)
        with self.lock:
            if key not in self.cache:
                if len(self.cache) >= 64:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[key] = compile_structure(self.tokenizer, structure, self.stops)
            return self.cache[key]

    def compile(self, structure: Structure):
        """The grammar, or a 400 on response_format when the schema cannot be compiled."""
        try:
            return self.get(structure)
        except LoraforgeError as e:
            raise BadRequest(400, str(e).replace("\n", " "), param="response_format") from None

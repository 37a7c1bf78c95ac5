"""OpenAI-compatible HTTP server over one base model and its LoRA adapters (Starlette + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (SSE streaming or not),
POST /v1/completions, and the admin endpoints POST /admin/adapters {"name", "path"} and
DELETE /admin/adapters/{name}. The request's `model` names an adapter or the base itself. Handlers only
validate and enqueue; the BatchWorker does the generating (continuous batching). Every user mistake is a
4xx JSON error in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Sampling: `temperature` (0 = greedy, up to 2), `top_p` (0 < p <= 1), `seed` (same seed, same answer),
`stop` (a string or up to 4), `max_tokens` / `max_completion_tokens`, and `n` = 1 only. Unlike OpenAI,
an absent temperature means greedy, so a fine-tuned model answers reproducibly unless asked to sample.
`ignore_eos` (as in vLLM) decodes through end-of-turn tokens up to max_tokens, for load tests.

Messages: roles system (or developer), user and assistant; `content` a string or OpenAI's list of parts
(text parts only). A tool/function message or an unknown role is a 400 (no tool calling). A last message
from the assistant is continued: its text is the start of the answer, and the reply holds what follows.
A client that goes away (streaming or not) cancels its request: its row leaves the batch at the next step.
Structured output: `response_format` {"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}
decodes only JSON that satisfies the schema, {"type": "json_object"} only a JSON object, {"type": "text"}
anything (the default); grammars are compiled once per schema (llguidance; extra `structured`) and cached.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import time
import uuid

from loraforge.errors import LoraforgeError
from loraforge.serve.batching import BatchWorker, Job, Sampling
from loraforge.serve.registry import Registry


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoraforgeError(f"`loraforge serve` needs {module.split('.')[0]}",
                             hint="pip install 'loraforge[serve]'") from None


def error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


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


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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


async def _cancel_on_disconnect(request, job) -> None:
    """Wait for the client to go away, then cancel its job (the worker drops its row at the next step)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            return


def context_limit(model, override: int | None = None) -> int:
    """Most tokens (prompt + answer) the model takes: its max_position_embeddings (2048 when unknown)."""
    cfg = getattr(model, "config", None)
    return override or getattr(cfg, "max_position_embeddings", None) or 2048


def parse_response_format(body: dict):
    """The request's Structure (loraforge.eval.structured), None for plain text, or a BadRequest."""
    from loraforge.eval.structured import Structure

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


class Grammars:
    """Compiled grammars by schema (the most recent 64), shared by the requests that use the same one."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        import threading

        self.tokenizer, self.stops, self.cache, self.lock = tokenizer, stop_ids, {}, threading.Lock()

    def get(self, structure):
        from loraforge.eval.structured import compile_structure

        key = json.dumps([structure.labels, structure.schema], sort_keys=True)
        with self.lock:
            if key not in self.cache:
                if len(self.cache) >= 64:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[key] = compile_structure(self.tokenizer, structure, self.stops)
            return self.cache[key]


def build_app(registry: Registry, *, api_key: str | None = None, max_batch: int = 16, wait_ms: float = 5.0,
              max_context: int | None = None):
    """The Starlette app; `app.state.worker` is its BatchWorker (closed on shutdown)."""
    _need("starlette")
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from loraforge.data.templates import prompt_text

    tok = registry.tokenizer
    limit = context_limit(registry.model, max_context)
    worker = BatchWorker(registry, max_batch=max_batch, wait_ms=wait_ms)
    grammars = Grammars(tok, sorted(worker.stops))
    created = int(time.time())

    def authorised(request) -> bool:
        given = request.headers.get("authorization", "").encode()
        return not api_key or hmac.compare_digest(given, f"Bearer {api_key}".encode())

    async def body_of(request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def parse(body: dict, chat: bool) -> tuple[Job, str, bool]:
        name = body.get("model")
        if name is None:
            raise BadRequest(400, f"the request names no model: give \"model\", one of {', '.join(registry.names())}",
                             param="model", code="missing_model")
        if not isinstance(name, str) or not registry.knows(name):
            raise BadRequest(404, f"the model '{name}' does not exist; available: {', '.join(registry.names())}",
                             param="model", code="model_not_found")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 128))
        if max_tokens is None:
            max_tokens = 128
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
        sampling = parse_sampling(body)
        if chat:
            turns, started = chat_messages(body.get("messages"))
            text = prompt_text(tok, turns) + started  # prompt_text leaves a last assistant turn out
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str):
                raise BadRequest(400, "prompt must be one string", param="prompt")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BadRequest(400, "the prompt is empty; give at least one token", param="prompt")
        if len(ids) + max_tokens > limit:
            raise BadRequest(400, f"this request needs {len(ids)} prompt + {max_tokens} completion tokens, "
                                  f"more than the model's context of {limit}; shorten it or lower max_tokens",
                             param="max_tokens", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(delta, finish):
            loop.call_soon_threadsafe(events.put_nowait, (delta, finish))

        job = Job(ids, registry.adapter_for(name), max_tokens, emit, sampling=sampling)
        job.events = events  # type: ignore[attr-defined]
        job.structure = parse_response_format(body)  # type: ignore[attr-defined]
        return job, name, bool(body.get("stream"))

    async def constrain(job: Job) -> None:
        """Give the job its grammar state (compiled off the event loop: the first one takes about a second)."""
        if job.structure is not None:  # type: ignore[attr-defined]
            try:
                grammar = await asyncio.to_thread(grammars.get, job.structure)  # type: ignore[attr-defined]
            except LoraforgeError as e:
                raise BadRequest(400, str(e).replace("\n", " "), param="response_format") from None
            job.grammar = grammar.start()

    async def generate(request, chat: bool):
        if not authorised(request):
            return error(401, "missing or wrong API key", type_="authentication_error", code="invalid_api_key")
        try:
            job, name, stream = parse(await body_of(request), chat)
            await constrain(job)
        except BadRequest as e:
            return error(e.status, e.message, param=e.param, code=e.code)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        worker.submit(job)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))

        def usage():
            return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": job.completion_tokens,
                    "total_tokens": len(job.prompt_ids) + job.completion_tokens}

        if not stream:
            parts, finish = [], None
            try:
                while finish is None:
                    delta, finish = await job.events.get()
                    if delta:
                        parts.append(delta)
            finally:
                job.cancelled.set()
                watcher.cancel()
            if finish == "error":
                return error(500, "".join(parts), type_="server_error")
            if finish == "adapter_unloaded":
                return error(404, f"the adapter '{name}' was unloaded", param="model", code="model_not_found")
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": name,
                                 "choices": [choice], "usage": usage()})

        def chunk(delta, finish):
            if chat:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
            obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": int(time.time()),
                   "model": name, "choices": [choice]}
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                while True:
                    delta, finish = await job.events.get()
                    if finish in ("error", "adapter_unloaded"):
                        msg = delta or f"the adapter '{name}' was unloaded"
                        yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                        break
                    if delta:
                        yield chunk({"content": delta}, None)
                    if finish is not None:
                        yield chunk({}, finish)
                        yield "data: [DONE]\n\n"
                        break
            finally:  # also on a client that went away: the worker drops its row
                job.cancelled.set()
                watcher.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completions(request):
        return await generate(request, True)

    async def completions(request):
        return await generate(request, False)

    async def models(request):
        if not authorised(request):
            return error(401, "missing or wrong API key", type_="authentication_error", code="invalid_api_key")
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "loraforge",
             "root": registry.base_name, "parent": None if n == registry.base_name else registry.base_name}
            for n in registry.names()]})

    async def health(request):
        return JSONResponse({"status": "ok", "base": registry.base_name, "adapters": list(registry.adapters),
                             "batching": worker.stats()})

    async def load_adapter(request):
        if not authorised(request):
            return error(401, "missing or wrong API key", type_="authentication_error", code="invalid_api_key")
        try:
            body = await body_of(request)
        except BadRequest as e:
            return error(e.status, e.message, code=e.code)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            return error(400, "give the adapter's name and path as strings", param="name")
        try:
            await asyncio.to_thread(registry.load, name, path)
        except LoraforgeError as e:
            status = 409 if "already loaded" in str(e) else 400
            return error(status, str(e), param="path", code="adapter_load_failed")
        return JSONResponse({"loaded": name, "models": registry.names()}, status_code=201)

    async def unload_adapter(request):
        if not authorised(request):
            return error(401, "missing or wrong API key", type_="authentication_error", code="invalid_api_key")
        name = request.path_params["name"]
        try:
            await asyncio.to_thread(registry.unload, name)
        except LoraforgeError as e:
            return error(404, str(e), param="name", code="model_not_found")
        return JSONResponse({"unloaded": name, "models": registry.names()})

    async def not_found(request, exc):
        return error(getattr(exc, "status_code", 404), f"{request.method} {request.url.path}: "
                     f"{getattr(exc, 'detail', 'not found')}")

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    app = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/admin/adapters", load_adapter, methods=["POST"]),
        Route("/admin/adapters/{name}", unload_adapter, methods=["DELETE"]),
    ], exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.worker = worker
    return app


def load_registry(base: str, adapters: dict[str, str], *, device: str = "auto", name: str | None = None) -> Registry:
    from loraforge.model.load import load_base, pick_device

    model, tok, _ = load_base(base, device=pick_device(device))
    model.eval()
    registry = Registry(model, tok, name or base)
    for n, p in adapters.items():
        registry.load(n, p)
    return registry


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads, so a busy port is said at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        busy = e.errno in (98, 48, 10048)  # EADDRINUSE on Linux, macOS, Windows
        raise LoraforgeError(f"cannot listen on {host}:{port}: " + ("the port is in use" if busy else e.strerror),
                             hint="pick another --port, or stop what listens there" if busy else
                             "check --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(base: str, adapters: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 16, wait_ms: float = 5.0, device: str = "auto",
          name: str | None = None) -> None:
    """Take the port, load everything (CLI errors surface before anyone can connect), then serve until Ctrl-C."""
    uvicorn = _need("uvicorn")
    _need("starlette")
    sock = bind(host, port)
    registry = load_registry(base, adapters, device=device, name=name)
    app = build_app(registry, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {', '.join(registry.names())} on http://{shown}:{sock.getsockname()[1]}/v1 "
          f"(OpenAI-compatible; Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
